"""Image benchmark (digits, or MNIST with ``--dataset mnist``): the bundled teacher at several NFE, real
floors, and (optionally) distilled students.

Every sampler is evaluated on the same class-balanced labels (n per run, default 1200) with the
classifier-feature metrics of :class:`scoredistill.metrics.images.ImageEvaluator`. The suite itself is
:func:`scoredistill.bench.digits.run_digits_suite` (also ``scoredistill bench --suite digits``).

Usage:
  python benchmarks/digits.py [--dataset digits|mnist] [--n 1200] [--threads 2] [--teacher PATH]
                              [--grid docs/images/digits_teacher.png]
                              [--distill recipes/digits/dmd2.yaml ...] [--set KEY=VALUE ...] [--runs DIR]
                              [--students RUN_DIR ...] [--steps-eval 1,2,4] [--json out.json]
Without ``--teacher`` the bundled teacher is used; ``--teacher`` takes a `train-teacher` folder
(or a snapshot of one). ``--distill`` runs each recipe with ``scoredistill``'s Distiller (wall time
measured) and adds its student to the table; ``--steps-eval 1,2,4`` samples each few-step student with 1, 2
and 4 of its steps (one row each, docs/fewstep.md's subset rule).
"""

from __future__ import annotations

import argparse
import sys

import torch

from scoredistill.bench.digits import DATASETS, markdown, run_digits_suite
from scoredistill.bench.steps_eval import parse_steps_eval
from scoredistill.bench.tables import write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=list(DATASETS), help="bundled teacher and evaluator")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default=None, help="a train-teacher folder (default: the bundled teacher)")
    ap.add_argument("--nfe", default="35,9,1", help="Heun NFE list for the teacher (1 = naive Euler step)")
    ap.add_argument("--grid", default=None, help="write a 10x10 grid of 35-NFE teacher samples (PNG)")
    ap.add_argument("--distill", nargs="*", default=[], help="recipes to distill and evaluate")
    ap.add_argument("--set", action="append", default=[], help="override for every --distill recipe")
    ap.add_argument("--runs", default="/tmp/scoredistill_image_runs")
    ap.add_argument("--students", nargs="*", default=[], help="finished run folders to evaluate (RUN_DIR/generator)")
    ap.add_argument("--steps-eval", default=None, help="K' list: few-step students sampled with K' of their steps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run_digits_suite(a.dataset, n=a.n, nfe=[int(v) for v in a.nfe.split(",")], seed=a.seed,
                            teacher_path=a.teacher, grid=a.grid, distill=a.distill, overrides=a.set, runs=a.runs,
                            students=a.students, log=lambda m: print(m, flush=True),
                            steps_eval=parse_steps_eval(a.steps_eval))
    print(markdown(rows))
    if a.json:
        write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
