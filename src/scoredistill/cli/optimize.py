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
    o = sub.add_parser("optimize", help="optimize particles / an image / a renderer under the teacher "
                                        "(SDS family, VSD/ESD)")
    o.add_argument("config", nargs="?", help="recipe YAML (recipes/optimize/*.yaml)")
    o.add_argument("--out", help="run folder to create")
    o.add_argument("--resume", metavar="RUN_DIR", help="continue the newest checkpoint of RUN_DIR")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    o.add_argument("--force", action="store_true",
                   help="start over in a run folder of ours that holds checkpoints (never touches other folders)")
    o.set_defaults(fn=cmd_optimize)
    return o
