"""``report.md`` for a finished run: baselines vs student, metrics table, pictures."""

from __future__ import annotations

import os
import time

import torch

from scoredistill.engine.io import atomic_write_text
from scoredistill.sampling import nfe, teacher_sample


def baselines(distiller, steps: int) -> list[tuple[str, int, torch.Tensor, float]]:
    """Teacher Heun (2*steps-1 NFE) and the naive one-step teacher, on the run's eval labels."""
    t = distiller.teacher
    n = len(distiller.eval_z)
    out = []
    for name, sampler, k in (("teacher", "heun", steps), ("naive 1-step teacher", "euler", 1)):
        g = torch.Generator().manual_seed(distiller.cfg["train"]["seed"] + 54321)
        t0 = time.time()
        x = teacher_sample(t, n, steps=k, sampler=sampler, cond=distiller.eval_cond, generator=g)
        out.append((name, nfe(sampler, k), x, time.time() - t0))
    return out


def rows_for(distiller, steps: int):
    """[(name, nfe, metrics, seconds, samples)] for the exact floor, teacher, naive and the student."""
    ev = distiller.evaluator
    n = len(distiller.eval_z)
    rows = []
    ref = ev.reference(n, distiller.eval_cond, seed=distiller.cfg["train"]["seed"])
    if ref is not None:
        rows.append(("exact samples (floor)", 0, ev.metrics(ref, distiller.eval_cond), 0.0, ref))
    for name, k, x, dt in baselines(distiller, steps):
        rows.append((name, k, ev.metrics(x, distiller.eval_cond), dt, x))
    t0 = time.time()
    x = distiller.sample(distiller.eval_z, distiller.eval_cond)
    k = student_steps(distiller.student())
    rows.append((f"student ({k}-step)", k, ev.metrics(x, distiller.eval_cond), time.time() - t0, x))
    return rows


def student_steps(gen) -> int:
    """Network evaluations of one sample of a student: ``num_steps`` where a generator declares it, the
    length of a few-step student's time list (``t_steps``), else one."""
    k = getattr(gen, "num_steps", None) or len(getattr(gen, "t_steps", ()) or ())
    return int(k) if k else 1


def table(rows, columns) -> str:
    from scoredistill.metrics.evaluator import Evaluator

    lines = ["| sampler | NFE | " + " | ".join(c[1] for c in columns) + " | time (s) |",
             "|" + "---|" * (len(columns) + 3)]
    for name, k, m, dt, _ in rows:
        vals = Evaluator.format_row(m, columns)
        lines.append(f"| {name} | {k if k else '–'} | " + " | ".join(vals) + f" | {dt:.2f} |")
    return "\n".join(lines)


def write_report(distiller, wall_s: float, steps: int = 18) -> tuple[str, list]:
    rows = rows_for(distiller, steps)
    run = distiller.run_dir
    ev = distiller.evaluator
    ev.plot([(f"{name} ({k} NFE)" if k else name, x) for name, k, _, _, x in rows],
            os.path.join(run, "comparison.png"))
    cfg = distiller.cfg
    obj = cfg["objective"]
    teacher = cfg["teacher"].get("preset") or cfg["teacher"].get("name") or cfg["teacher"].get("path") or "custom"
    tab = table(rows, ev.columns)
    md = [f"# scoredistill run: {obj['name']} on {teacher}", "",
          f"- objective: `{obj}`",
          f"- teacher: `{cfg['teacher']['kind']}` {teacher}, process `{cfg['teacher']['process']}`",
          f"- generator: `{cfg['generator']}`",
          f"- iterations: {distiller.step} (generator every {cfg['train']['generator_every']}), "
          f"batch {cfg['train']['batch_size']}, wall {wall_s:.1f} s",
          f"- non-finite steps skipped: {distiller.nonfinite}", "",
          "## Results", "", tab, "",
          getattr(ev, "legend", "Metrics on the run's evaluation noise; the floor row compares exact samples "
                  "with independent exact samples."),
          "", "![comparison](comparison.png)", ""]
    sdir = os.path.join(run, "samples")
    samples = sorted(os.listdir(sdir)) if os.path.isdir(sdir) else []
    if samples:
        md += ["## Training snapshots", ""] + [f"![{s}](samples/{s})" for s in samples[-3:]] + [""]
    atomic_write_text(os.path.join(run, "report.md"), "\n".join(md))
    return tab, rows
