"""The image suite (bundled digits, or MNIST): the teacher at several NFE, the real-data floor, and
(optionally) distilled one-step students, all on the same class-balanced labels.

Every sampler is evaluated with the classifier-feature metrics of
:class:`scoredistill.metrics.images.ImageEvaluator` (FD, confidence, label accuracy, class balance,
diversity). ``distill`` recipes are trained with the Distiller (wall time measured) and their one-step
student is added to the table; ``students`` are finished run folders evaluated as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence

import torch

from scoredistill.bench.tables import Column, markdown_table, write_tables

DATASETS = ("digits", "mnist")
COLUMNS = ("sampler", "nfe", "fd", "conf90", "label_acc", "class_min", "class_max", "diversity", "non_finite",
           "seconds", "train_wall_s")
_METRICS = (("fd", "FD ↓", "{:.2f}"), ("conf90", "conf>0.9", "{:.3f}"), ("label_acc", "label acc", "{:.3f}"),
            ("class_min", "min class", "{:.3f}"), ("class_max", "max class", "{:.3f}"),
            ("diversity", "diversity", "{:.2f}"))


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(num_classes).repeat(n // num_classes + 1)[:n]


def row(name, nfe, m, seconds):
    return {"sampler": name, "nfe": nfe, "seconds": round(seconds, 2),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}}


def _metric(k: str, fmt: str):
    return lambda r: fmt.format(r[k]) if k in r else "–"


MARKDOWN = ([Column("sampler", lambda r: str(r["sampler"])), Column("NFE", lambda r: str(r["nfe"] or "–"))]
            + [Column(title, _metric(k, fmt)) for k, title, fmt in _METRICS]
            + [Column("time (s)", lambda r: f"{r['seconds']:.2f}")])


def markdown(rows) -> str:
    return "\n".join(markdown_table(rows, MARKDOWN))


def _student_rows(name: str, gen, z, cond, ev, steps_eval: Sequence[int] | None, device=None) -> list[dict]:
    """The rows of one student: sampled with all its steps (one row, NFE = its steps), or with each ``K'`` of
    ``steps_eval`` (bench/steps_eval.py; NFE = K', the name says "K' of K steps")."""
    from scoredistill.bench.steps_eval import sample_steps, steps_for
    from scoredistill.engine.report import student_steps

    k = student_steps(gen)
    out = []
    for s in steps_for(steps_eval, k, name) if steps_eval else [None]:
        t0 = time.time()
        if s is None:
            with torch.no_grad():
                x = gen(z.to(device) if device is not None else z, cond).cpu()
        else:
            x = sample_steps(gen, z, cond, s, device)
        dt = time.time() - t0
        label = name if s is None else f"{name}, {s} of {k} steps"
        out.append(row(label, s or k, ev.metrics(x, cond), dt))
    return out


def run_digits_suite(dataset: str = "digits", n: int = 1200, nfe: Sequence[int] = (35, 9, 1), seed: int = 0,
                     teacher_path: str | None = None, grid: str | None = None, distill: Sequence[str] = (),
                     overrides: Sequence[str] = (), runs: str = "/tmp/scoredistill_image_runs",
                     students: Sequence[str] = (), out_dir: str | None = None, log=print,
                     steps_eval: Sequence[int] | None = None) -> list[dict]:
    """Evaluate the floor, the teacher at each ``nfe`` (Heun; 1 = one naive Euler step from sigma_max),
    the ``distill`` recipes and the ``students`` run folders; with ``out_dir`` write ``results.md``,
    ``results.csv`` and ``results.json``. Returns the rows. ``log`` receives one JSON line per row.
    ``steps_eval`` (K' list) samples each few-step student with K' of its steps, one row each (a one-step
    student gives its one row); a K' above a few-step student's K is a ConfigError naming ``--steps-eval``."""
    from scoredistill.engine.build import build_teacher
    from scoredistill.engine.report import student_steps
    from scoredistill.metrics.images import ImageEvaluator
    from scoredistill.sampling import teacher_sample

    say = log or (lambda m: None)
    tcfg = {"kind": "learned", "path": teacher_path} if teacher_path else {"kind": "bundled", "name": dataset}
    teacher, _ = build_teacher(tcfg)
    ev = ImageEvaluator(dataset, seed=seed)
    cond = balanced_labels(n)
    rows = []
    split = ev.split
    rows.append(row("real: training split (floor)", 0, ev.metrics(split.x_train, split.y_train), 0.0))
    for k in nfe:
        g = torch.Generator().manual_seed(seed + 54321)
        t0 = time.time()
        if k == 1:
            x = teacher_sample(teacher, n, steps=1, sampler="euler", cond=cond, generator=g)
            name = "teacher, naive 1 step (Euler from sigma_max)"
        else:
            x = teacher_sample(teacher, n, steps=(k + 1) // 2, sampler="heun", cond=cond, generator=g)
            name = f"teacher, EDM Heun {(k + 1) // 2} steps"
        dt = time.time() - t0
        rows.append(row(name, k, ev.metrics(x, cond), dt))
        say(json.dumps(rows[-1]))
        if k == 35 and grid:
            from scoredistill.viz.images import image_grid_panels

            g10 = torch.cat([x[cond == c][:10] for c in range(10)])  # row c = class c
            image_grid_panels([(f"{dataset} teacher, 35 NFE (row k: class k)", g10)], grid)
    for recipe in distill:
        from scoredistill.config import load_yaml, resolve
        from scoredistill.engine.distiller import Distiller

        name = os.path.splitext(os.path.basename(recipe))[0]
        cfg = resolve(load_yaml(recipe), list(overrides) + ["train.progress=false"])
        run = os.path.join(runs, name)
        if os.path.exists(run):
            shutil.rmtree(run)
        t0 = time.time()
        d = Distiller(cfg, run)
        d.train()
        wall = time.time() - t0
        z = torch.randn(n, *teacher.data_shape, generator=torch.Generator().manual_seed(seed + 999))
        if steps_eval:
            new = _student_rows(f"{name} student ({cfg['train']['steps']} it, train wall {wall:.0f} s)",
                                d.student(), z, cond, ev, steps_eval, d.device)
        else:
            t0 = time.time()
            x = d.sample(z, cond)
            dt = time.time() - t0
            new = [row(f"{name} student ({cfg['train']['steps']} it, train wall {wall:.0f} s)",
                       student_steps(d.student()), ev.metrics(x, cond), dt)]
        for r in new:
            r["train_wall_s"] = round(wall, 1)
            rows.append(r)
            say(json.dumps(r))
    for run in students:
        from scoredistill.config import load_yaml
        from scoredistill.models.registry import load_model

        gen, _ = load_model(os.path.join(run, "generator"))
        gen.eval()
        cfg = load_yaml(os.path.join(run, "config.yaml"))
        z = torch.randn(n, *teacher.data_shape, generator=torch.Generator().manual_seed(seed + 999))
        name = f"{cfg['objective']['name']} student ({cfg['train']['steps']} it, {os.path.basename(run.rstrip('/'))})"
        for r in _student_rows(name, gen, z, cond, ev, steps_eval):
            rows.append(r)
            say(json.dumps(r))
    if out_dir:
        header = [f"# {dataset} bench: {n} class-balanced samples per sampler, seed {seed}", ""]
        write_tables(out_dir, rows, COLUMNS, header + markdown_table(rows, MARKDOWN), json_name="results.json")
    return rows
