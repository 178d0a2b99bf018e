"""``scoredistill optimize CONFIG.yaml --out RUN_DIR [--set KEY=VALUE ...]`` (or ``--resume RUN_DIR``).

Optimizes particles / an image tensor / a user renderer under the teacher with the configured
objective and writes ``RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/, samples/, params.safetensors,
particles.npy (particles) or renders.npy, report.md}``. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import time


def cmd_optimize(args):
    from scoredistill.config import ConfigError, load_yaml
    from scoredistill.engine.io import list_checkpoints
    from scoredistill.optimize.config import resolve
    from scoredistill.optimize.driver import PriorOptimizer

    if args.resume:
        run_dir = args.resume
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.isdir(run_dir):
            raise ConfigError("--resume", f"folder not found: {run_dir}")
        if not os.path.exists(path):
            raise ConfigError("--resume", f"{run_dir} has no config.yaml (not a scoredistill optimize run)")
        cfg = resolve(load_yaml(path), args.set)
    else:
        if not args.config or not args.out:
            raise ConfigError("optimize", "needs CONFIG.yaml --out RUN_DIR, or --resume RUN_DIR")
        run_dir = args.out
        cfg = resolve(load_yaml(args.config), args.set)
        if list_checkpoints(run_dir) or os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ConfigError("--out", f"{run_dir} already holds a run; use --resume {run_dir} or "
                              "another --out")
    t0 = time.time()
    opt = PriorOptimizer(cfg, run_dir)
    res = opt.run(resume=bool(args.resume))
    print(opt.report(res, time.time() - t0))
    print(f"wrote {run_dir}")
    return res


def add_optimize_parser(sub):
    o = sub.add_parser("optimize", help="optimize particles / an image / a renderer under the teacher "
                                        "(SDS family, VSD/ESD)")
    o.add_argument("config", nargs="?", help="recipe YAML (recipes/optimize/*.yaml)")
    o.add_argument("--out", help="run folder to create")
    o.add_argument("--resume", metavar="RUN_DIR", help="continue the newest checkpoint of RUN_DIR")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    o.set_defaults(fn=cmd_optimize)
    return o
