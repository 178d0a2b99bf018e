"""``scoredistill demo``: the embedded default run.

An exact-score ring of 8 Gaussians (EDM process) is distilled with DMD2 into a one-step MLP
generator in about a minute on two CPU cores; the report compares the teacher's 35-NFE Heun
sampler, the naive one-step teacher and the student on the same noise.
"""

from __future__ import annotations

import os
import time

from scoredistill.config import resolve
from scoredistill.engine.rundir import RunLock, check_new, clear_own

DEMO_CONFIG = {
    "teacher": {"kind": "gmm", "preset": "ring8", "process": {"kind": "edm"}},
    "generator": {"kind": "mlp", "width": 256, "depth": 4},
    "fake_score": {"kind": "mlp", "width": 256, "depth": 4},
    "objective": {"name": "dmd2", "guidance_scale": 1.0, "time": {"kind": "uniform", "t_min": 0.02, "t_max": 0.98}},
    "train": {"steps": 1500, "batch_size": 256, "lr": 1e-3, "fake_lr": 1e-3, "betas": [0.0, 0.99],
              "generator_every": 5, "fake_on_generator_steps": True, "ema": 0.99, "checkpoint_every": 1500,
              "threads": 2},
    "eval": {"every": 250, "n_samples": 2000},
}


# the bundled 8x8 digits teacher -> one-step DMD2 generator (recipes/digits/dmd2.yaml)
DEMO_IMAGE_CONFIG = {
    "teacher": {"kind": "bundled", "name": "digits"},
    "generator": {"kind": "teacher", "sigma_init": 2.5},
    "fake_score": {"kind": "teacher"},
    "objective": {"name": "dmd2", "guidance_scale": 1.0,
                  "time": {"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2},
                  "fake_time": {"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2}},
    "train": {"steps": 400, "batch_size": 128, "lr": 1e-4, "fake_lr": 1e-4, "betas": [0.0, 0.99],
              "generator_every": 1, "ema": 0.99, "checkpoint_every": 400, "log_every": 25, "threads": 2},
    "eval": {"every": 100, "n_samples": 1000},
}


def run_demo(out: str, quick: bool = False, image: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table

    from scoredistill.engine.distiller import Distiller
    from scoredistill.engine.report import write_report
    from scoredistill.metrics.evaluator import Evaluator

    console = Console() if Console().is_terminal else Console(width=120)
    overrides = (["train.steps=20", "eval.every=10", "eval.n_samples=100"] if image else
                 ["train.steps=300", "eval.every=100"]) if quick else []
    cfg = resolve(DEMO_IMAGE_CONFIG if image else DEMO_CONFIG, overrides)
    # the demo starts over in a folder it wrote before; a folder holding anything else is never touched
    check_new(out, "--out", force=True)
    what = "bundled digits teacher (EDM UNet)" if image else "ring8 teacher (exact score)"
    updates = cfg["train"]["steps"] // cfg["train"]["generator_every"]
    console.print(f"[bold]scoredistill demo[/]: {what} -> one-step generator with DMD2, "
                  f"{cfg['train']['steps']} iterations ({updates} generator updates)")
    t0 = time.time()
    d = Distiller(cfg, out, log=console.print)
    with RunLock(out, "demo"):
        clear_own(out)  # a demo folder of ours starts over; files the user put there stay
        d.run()
        train_s = time.time() - t0
        _, rows = write_report(d, train_s, cfg["eval"]["teacher_steps"])
    name = "digits" if image else "ring8"
    tab = Table(title=f"{name}, {len(d.eval_z)} samples each (train {train_s:.0f} s)")
    tab.add_column("sampler")
    tab.add_column("NFE", justify="right")
    tab.add_column("time (s)", justify="right")
    for _, label, _ in d.evaluator.columns:
        tab.add_column(label, justify="right")
    for row_name, k, m, dt, _ in rows:
        tab.add_row(row_name, str(k) if k else "–", f"{dt:.2f}", *Evaluator.format_row(m, d.evaluator.columns))
    console.print(tab)
    console.print(f"report: {os.path.join(out, 'report.md')}  plots: {os.path.join(out, 'comparison.png')}, "
                  f"{os.path.join(out, 'samples')}/  total {time.time() - t0:.0f} s")
    return {name: m for name, _, m, _, _ in rows}
