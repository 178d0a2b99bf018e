"""Image benchmark (digits, or MNIST with ``--dataset mnist``): the bundled teacher at several NFE, real
floors, and (optionally) distilled students.

Every sampler is evaluated on the same class-balanced labels (n per run, default 1200) with the
classifier-feature metrics of :class:`scoredistill.metrics.images.ImageEvaluator`.

Usage:
  python benchmarks/digits.py [--dataset digits|mnist] [--n 1200] [--threads 2] [--teacher PATH]
                              [--grid docs/images/digits_teacher.png]
                              [--distill recipes/digits/dmd2.yaml ...] [--set KEY=VALUE ...] [--runs DIR]
                              [--students RUN_DIR ...] [--json out.json]
Without ``--teacher`` the bundled teacher is used; ``--teacher`` takes a `train-teacher` folder
(or a snapshot of one). ``--distill`` runs each recipe with ``scoredistill``'s Distiller (wall time
measured) and adds its 1-step student to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(num_classes).repeat(n // num_classes + 1)[:n]


def row(name, nfe, m, seconds):
    return {"sampler": name, "nfe": nfe, "seconds": round(seconds, 2),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}}


def markdown(rows) -> str:
    keys = [("fd", "FD ↓", "{:.2f}"), ("conf90", "conf>0.9", "{:.3f}"), ("label_acc", "label acc", "{:.3f}"),
            ("class_min", "min class", "{:.3f}"), ("class_max", "max class", "{:.3f}"),
            ("diversity", "diversity", "{:.2f}")]
    out = ["| sampler | NFE | " + " | ".join(k[1] for k in keys) + " | time (s) |",
           "|---|---|" + "---|" * len(keys) + "---|"]
    for r in rows:
        vals = [f.format(r[k]) if k in r else "–" for k, _, f in keys]
        out.append(f"| {r['sampler']} | {r['nfe'] or '–'} | " + " | ".join(vals) + f" | {r['seconds']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"], help="bundled teacher and evaluator")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default=None, help="a train-teacher folder (default: the bundled teacher)")
    ap.add_argument("--nfe", default="35,9,1", help="Heun NFE list for the teacher (1 = naive Euler step)")
    ap.add_argument("--grid", default=None, help="write a 10x10 grid of 35-NFE teacher samples (PNG)")
    ap.add_argument("--distill", nargs="*", default=[], help="recipes to distill and evaluate")
    ap.add_argument("--set", action="append", default=[], help="override for every --distill recipe")
    ap.add_argument("--runs", default="/tmp/scoredistill_image_runs")
    ap.add_argument("--students", nargs="*", default=[], help="finished run folders to evaluate (RUN_DIR/generator)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from scoredistill.engine.build import build_teacher
    from scoredistill.metrics.images import ImageEvaluator
    from scoredistill.sampling import teacher_sample

    tcfg = {"kind": "learned", "path": a.teacher} if a.teacher else {"kind": "bundled", "name": a.dataset}
    teacher, _ = build_teacher(tcfg)
    ev = ImageEvaluator(a.dataset, seed=a.seed)
    cond = balanced_labels(a.n)
    rows = []
    split = ev.split
    rows.append(row("real: training split (floor)", 0, ev.metrics(split.x_train, split.y_train), 0.0))
    for k in [int(v) for v in a.nfe.split(",")]:
        g = torch.Generator().manual_seed(a.seed + 54321)
        t0 = time.time()
        if k == 1:
            x = teacher_sample(teacher, a.n, steps=1, sampler="euler", cond=cond, generator=g)
            name = "teacher, naive 1 step (Euler from sigma_max)"
        else:
            x = teacher_sample(teacher, a.n, steps=(k + 1) // 2, sampler="heun", cond=cond, generator=g)
            name = f"teacher, EDM Heun {(k + 1) // 2} steps"
        dt = time.time() - t0
        rows.append(row(name, k, ev.metrics(x, cond), dt))
        print(json.dumps(rows[-1]), flush=True)
        if k == 35 and a.grid:
            from scoredistill.viz.images import image_grid_panels

            grid = torch.cat([x[cond == c][:10] for c in range(10)])  # row c = class c
            image_grid_panels([(f"{a.dataset} teacher, 35 NFE (row k: class k)", grid)], a.grid)
    for recipe in a.distill:
        from scoredistill.config import load_yaml, resolve
        from scoredistill.engine.distiller import Distiller

        name = os.path.splitext(os.path.basename(recipe))[0]
        cfg = resolve(load_yaml(recipe), a.set + ["train.progress=false"])
        run = os.path.join(a.runs, name)
        if os.path.exists(run):
            import shutil

            shutil.rmtree(run)
        t0 = time.time()
        d = Distiller(cfg, run)
        d.train()
        wall = time.time() - t0
        z = torch.randn(a.n, *teacher.data_shape, generator=torch.Generator().manual_seed(a.seed + 999))
        t0 = time.time()
        x = d.sample(z, cond)
        dt = time.time() - t0
        r = row(f"{name} student ({cfg['train']['steps']} it, train wall {wall:.0f} s)", 1, ev.metrics(x, cond), dt)
        r["train_wall_s"] = round(wall, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
    for run in a.students:
        from scoredistill.config import load_yaml
        from scoredistill.models.registry import load_model

        gen, _ = load_model(os.path.join(run, "generator"))
        gen.eval()
        cfg = load_yaml(os.path.join(run, "config.yaml"))
        z = torch.randn(a.n, *teacher.data_shape, generator=torch.Generator().manual_seed(a.seed + 999))
        t0 = time.time()
        with torch.no_grad():
            x = gen(z, cond)
        dt = time.time() - t0
        name = f"{cfg['objective']['name']} student ({cfg['train']['steps']} it, {os.path.basename(run.rstrip('/'))})"
        rows.append(row(name, 1, ev.metrics(x, cond), dt))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
