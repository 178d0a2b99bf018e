"""``scoredistill demo``: the embedded default run.

An exact-score ring of 8 Gaussians (EDM process) is distilled with DMD2 into a one-step MLP
generator in about a minute on two CPU cores; the report compares the teacher's 35-NFE Heun
sampler, the naive one-step teacher and the student on the same noise.
"""

from __future__ import annotations

import os
import shutil
import time

from scoredistill.config import resolve

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


def run_demo(out: str, quick: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table

    from scoredistill.engine.distiller import Distiller
    from scoredistill.engine.report import write_report
    from scoredistill.metrics.evaluator import Evaluator

    console = Console() if Console().is_terminal else Console(width=120)
    overrides = ["train.steps=300", "eval.every=100"] if quick else []
    cfg = resolve(DEMO_CONFIG, overrides)
    if os.path.isdir(out):  # the demo folder is the demo's own scratch space
        shutil.rmtree(out)
    console.print(f"[bold]scoredistill demo[/]: ring8 teacher (exact score) -> one-step generator with DMD2, "
                  f"{cfg['train']['steps']} iterations ({cfg['train']['steps'] // 5} generator updates)")
    t0 = time.time()
    d = Distiller(cfg, out, log=console.print)
    d.train()
    train_s = time.time() - t0
    _, rows = write_report(d, train_s, cfg["eval"]["teacher_steps"])
    tab = Table(title=f"ring8, {len(d.eval_z)} samples each (train {train_s:.0f} s)")
    tab.add_column("sampler")
    tab.add_column("NFE", justify="right")
    for _, label, _ in d.evaluator.columns:
        tab.add_column(label, justify="right")
    for name, k, m, _, _ in rows:
        tab.add_row(name, str(k) if k else "–", *Evaluator.format_row(m, d.evaluator.columns))
    console.print(tab)
    console.print(f"report: {os.path.join(out, 'report.md')}  plots: {os.path.join(out, 'comparison.png')}, "
                  f"{os.path.join(out, 'samples')}/  total {time.time() - t0:.0f} s")
    return {name: m for name, _, m, _, _ in rows}
