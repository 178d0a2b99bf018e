"""``scoredistill optimize CONFIG.yaml --out RUN_DIR [--set KEY=VALUE ...]`` (or ``--resume RUN_DIR``).

Optimizes particles / an image tensor / a user renderer under the teacher with the configured
objective and writes ``RUN_DIR/{config.yaml, metrics.jsonl, checkpoints/, samples/, params.safetensors,
particles.npy (particles) or renders.npy, report.md}``. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import os


def cmd_optimize(args):
    from scoredistill.cli.main import steps_done
    from scoredistill.config import ConfigError, check_resume_overrides, load_yaml
    from scoredistill.engine.io import atomic_write_text, list_checkpoints
    from scoredistill.optimize.config import OPTIMIZE, resolve
    from scoredistill.optimize.driver import PriorOptimizer

    if args.resume:
        run_dir = args.resume
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.isdir(run_dir):
            raise ConfigError("--resume", f"folder not found: {run_dir}")
        if not os.path.exists(path):
            raise ConfigError("--resume", f"{run_dir} has no config.yaml (not a scoredistill optimize run)")
        saved = load_yaml(path)
        check_resume_overrides(args.set, saved, steps_done(run_dir), OPTIMIZE)
        cfg = resolve(saved, args.set)
    else:
        if not args.config or not args.out:
            raise ConfigError("optimize", "needs CONFIG.yaml --out RUN_DIR, or --resume RUN_DIR")
        run_dir = args.out
        cfg = resolve(load_yaml(args.config), args.set)
        if list_checkpoints(run_dir) or os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ConfigError("--out", f"{run_dir} already holds a run; use --resume {run_dir} or "
                              "another --out")
    opt = PriorOptimizer(cfg, run_dir)
    res = opt.run(resume=bool(args.resume))
    title = f"# scoredistill optimize: {opt.objective.name} on {opt.param.kind} ({opt.param.num_items} items)"
    lines = [title,
             "", f"steps: {opt.step}, wall: {res.get('wall_s', 0):.1f} s", "",
             "| metric | value |", "|---|---|"]
    for k, v in res.items():
        if isinstance(v, (int, float)) and k not in ("step", "wall_s"):
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    samples = os.path.join(run_dir, "samples")
    pngs = sorted(os.listdir(samples)) if os.path.isdir(samples) else []
    if pngs:
        lines += ["", f"![final](samples/{pngs[-1]})"]
    atomic_write_text(os.path.join(run_dir, "report.md"), "\n".join(lines) + "\n")
    summary = ", ".join(f"{k} {res[k]:.3f}" for k in ("precision", "sw2", "spread_ratio", "mode_spread_ratio",
                                                       "class_accuracy") if isinstance(res.get(k), float))
    print(f"step {opt.step}: {summary}" if summary else f"step {opt.step}")
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
