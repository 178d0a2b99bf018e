"""``scoredistill optimize CONFIG.yaml --out RUN_DIR [--set KEY=VALUE ...]`` (or ``--resume RUN_DIR``).

Optimizes particles / an image tensor / a user renderer under the teacher with the configured
objective and writes ``RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/, samples/, params.safetensors,
particles.npy (particles) or renders.npy, report.md}``. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations


def cmd_optimize(args):
    from scoredistill.cli.runs import run_in_folder
    from scoredistill.optimize.config import OPTIMIZE, resolve
    from scoredistill.optimize.driver import PriorOptimizer

    return run_in_folder(args, command="optimize", resolve=resolve, build=PriorOptimizer, schema=OPTIMIZE)


def add_optimize_parser(sub):
    from scoredistill.cli.runs import add_run_arguments

    o = sub.add_parser("optimize", help="optimize particles / an image / a renderer under the teacher "
                                        "(SDS family, VSD/ESD)")
    add_run_arguments(o, "recipes/optimize")
    o.set_defaults(fn=cmd_optimize)
    return o
