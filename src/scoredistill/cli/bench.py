"""``scoredistill bench --suite toy``: every generator recipe on every toy teacher, same budget and seeds.

For each recipe ``recipes/toy/<method>.yaml`` whose objective is registered, and each teacher preset,
the recipe is run with only ``teacher.preset`` (and the seed) changed. The training length is either
fixed (``--steps N``) or derived from a wall-clock budget (``--budget-seconds S``): a few iterations
are timed and ``train.steps`` is set so the run takes about ``S`` seconds (the derived steps are
written to the table, so a run can be repeated exactly with ``--steps``; the calibration iterations
count as training). On a shared machine the derived steps follow the load at calibration time.
Recipes that cannot run on a teacher (e.g. they need class labels) get a row saying why.

Outputs under ``--out``: ``results.csv`` (one row per run), ``results.md`` (one table per teacher
with the exact-sample floor first), ``plots/<method>__<teacher>.png`` (target vs student), and
``runs/<method>__<teacher>__s<seed>/`` (the run folder) with ``runs/<...>.json`` (its result row, so
an interrupted bench continues where it stopped; ``--fresh`` reruns everything).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

SUITES = {"toy": ("ring8", "grid25", "pair", "asym", "gmm16d"),
          # optimization under a prior: particles (scoredistill.optimize.bench)
          "sds": ("ring8", "pair", "gmm10d", "ring8_cond")}
DEFAULT_BUDGET_S = 30.0
COLUMNS = ["method", "objective", "teacher", "seed", "steps", "precision", "modes_covered", "num_modes", "weight_tv",
           "sw2", "mmd", "spread_ratio", "non_finite", "skipped_steps", "wall_s", "status"]


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="run every toy recipe on the toy teachers with one budget; write tables + plots")
    b.add_argument("--suite", default="toy", choices=sorted(SUITES))
    b.add_argument("--methods", default=None, help="comma-separated recipe names (default: all in the recipe folder)")
    b.add_argument("--teachers", default=None, help=f"comma-separated presets (default: {','.join(SUITES['toy'])})")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--budget-seconds", type=float, default=None,
                   help=f"wall-clock training budget per run (default {DEFAULT_BUDGET_S:g}); sets train.steps")
    g.add_argument("--steps", type=int, default=None, help="fixed train.steps for every run instead of a budget")
    b.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    b.add_argument("--n-eval", type=int, default=2000, help="evaluation samples per run")
    b.add_argument("--recipes", default=None, help="recipe folder (default recipes/<suite>)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every run")
    b.add_argument("--fresh", action="store_true", help="rerun runs that already have a result")
    b.add_argument("--out", default=None, help="output folder (default bench/<suite>)")
    b.set_defaults(fn=cmd_bench)


def _recipe_dir(args) -> Path:
    from scoredistill.config import ConfigError

    if args.recipes:
        d = Path(args.recipes)
    else:
        d = Path("recipes") / args.suite
        if not d.is_dir():  # running outside the repository root: the checkout next to the package
            d = Path(__file__).resolve().parents[3] / "recipes" / args.suite
    if not d.is_dir():
        raise ConfigError("--recipes", f"folder not found: {d}")
    return d


def discover(recipe_dir: Path) -> dict[str, tuple[Path, str]]:
    """``{method: (recipe path, objective name)}`` for recipes whose objective is registered."""
    from scoredistill.config import ConfigError, load_yaml
    from scoredistill.objectives import OBJECTIVES

    out = {}
    for path in sorted(recipe_dir.glob("*.yaml")):
        try:
            name = (load_yaml(path).get("objective") or {}).get("name")
        except ConfigError:
            continue
        if name in OBJECTIVES:
            out[path.stem] = (path, name)
    return out


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def run_one(method: str, recipe: Path, teacher: str, seed: int, args, run_dir: str, plot_path: str | None) -> dict:
    """Train one recipe on one teacher; returns a result row (never raises for bad combinations)."""
    from scoredistill.config import ConfigError, load_yaml, resolve
    from scoredistill.engine.distiller import Distiller, TrainingAborted

    row = {"method": method, "teacher": teacher, "seed": seed, "status": "ok"}
    overrides = [f"teacher.preset={teacher}", f"train.seed={seed}", "train.progress=false", "eval.plots=false",
                 f"eval.n_samples={args.n_eval}", "train.checkpoint_every=1000000000", "train.keep_checkpoints=1"]
    if args.steps:
        overrides += [f"train.steps={args.steps}", f"eval.every={args.steps}"]
    t0 = time.time()
    try:
        raw = load_yaml(recipe)
        raw.setdefault("teacher", {})
        for k in ("means", "std", "stds", "weights", "classes"):  # the preset replaces an explicit mixture
            raw["teacher"].pop(k, None)
        cfg = resolve(raw, overrides + list(args.set))
        row["objective"] = cfg["objective"]["name"]
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        d = Distiller(cfg, run_dir, log=lambda m: None)
        if not args.steps:
            budget = args.budget_seconds if args.budget_seconds is not None else DEFAULT_BUDGET_S
            every = cfg["train"]["generator_every"]
            warm = every                      # untimed: first passes pay one-off allocation / lazy-init costs
            calib = every * max(1, -(-10 // every))  # timed: whole update cycles, >= 10 iterations
            for _ in range(warm):
                d.train_step()
            tc = time.time()
            for _ in range(calib):
                d.train_step()
            per_it = (time.time() - tc) / calib
            steps = max(warm + calib + 1, int(round(budget / max(per_it, 1e-6))))
            d.cfg["train"]["steps"] = steps
            d.cfg["eval"]["every"] = steps
        res = d.train()
        row["steps"] = d.cfg["train"]["steps"]
        for k in ("precision", "modes_covered", "num_modes", "weight_tv", "sw2", "mmd", "spread_ratio", "non_finite"):
            row[k] = res.get(k)
        row["skipped_steps"] = int(sum(d.nonfinite.values()))
        if plot_path:
            x = d.sample(d.eval_z, d.eval_cond)
            ref = d.evaluator.reference(len(x), d.eval_cond, seed=seed)
            panels = ([("target", ref)] if ref is not None else []) + [(f"{method} ({row['steps']} it)", x)]
            d.evaluator.plot(panels, plot_path, title=f"{method} on {teacher}")
        close = getattr(d, "close", None)
        if close:
            close()
    except ConfigError as e:
        row["status"] = f"n/a: {e}"
    except TrainingAborted as e:
        row["status"] = f"aborted: {str(e).splitlines()[0]}"
    row["wall_s"] = round(time.time() - t0, 1)
    return row


def floor_row(teacher: str, n: int, seed: int) -> dict:
    from scoredistill.engine.build import build_evaluator, build_teacher

    t, ref = build_teacher({"kind": "gmm", "preset": teacher, "process": {"kind": "edm"}})
    m = build_evaluator(t, ref, seed).floor(n)
    row = {"method": "exact samples (floor)", "objective": "–", "teacher": teacher, "seed": seed, "steps": 0,
           "skipped_steps": 0, "wall_s": 0.0, "status": "ok"}
    row.update({k: m.get(k) for k in ("precision", "modes_covered", "num_modes", "weight_tv", "sw2", "mmd",
                                       "spread_ratio", "non_finite")})
    return row


def _fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if key == "modes_covered":
        return f"{v}/{row.get('num_modes')}"
    if key in ("precision", "weight_tv", "sw2"):
        return f"{v:.3f}"
    if key == "mmd":
        return f"{v:.4f}"
    if key == "spread_ratio":
        return f"{v:.2f}"
    return str(v)


def write_tables(rows: list[dict], out: str, header: list[str]) -> None:
    from scoredistill.fileio import atomic_write_text

    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, os.path.join(out, "results.csv"))
    cols = [("steps", "steps"), ("precision", "precision ↑"), ("modes_covered", "modes"), ("weight_tv", "weight TV ↓"),
            ("sw2", "SW2 ↓"), ("non_finite", "non-finite (samples / skipped steps)"), ("wall_s", "wall (s)")]
    md = header[:]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        md += ["", f"### {teacher}", "", "| method | seed | " + " | ".join(c[1] for c in cols) + " | note |",
               "|" + "---|" * (len(cols) + 3)]
        for r in [r for r in rows if r["teacher"] == teacher]:
            if not r["status"].startswith("ok"):
                md.append(f"| {r['method']} | {r['seed']} | " + " | ".join("–" for _ in cols[:-1])
                          + f" | {r['wall_s']} | {r['status'].replace('|', '/')} |")
                continue
            vals = [_fmt(r, k) for k, _ in cols]
            vals[5] = f"{_fmt(r, 'non_finite')} / {r.get('skipped_steps', 0)}"
            md.append(f"| {r['method']} | {r['seed']} | " + " | ".join(vals) + " | |")
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(md) + "\n")


def _command(args, methods, teachers, seeds) -> str:
    """The command line that reproduces this bench (explicit lists, so it does not depend on defaults)."""
    parts = ["scoredistill bench", f"--suite {args.suite}", f"--methods {','.join(methods)}",
             f"--teachers {','.join(teachers)}"]
    parts.append(f"--steps {args.steps}" if args.steps else
                 f"--budget-seconds {args.budget_seconds if args.budget_seconds is not None else DEFAULT_BUDGET_S:g}")
    parts += [f"--seeds {','.join(map(str, seeds))}", f"--n-eval {args.n_eval}"]
    parts += [f"--set {s}" for s in args.set]
    parts.append(f"--out {args.out}")
    return " ".join(parts)


def cmd_bench(args):
    import torch

    if args.out is None:
        args.out = os.path.join("bench", args.suite)
    if args.suite == "sds":
        return _cmd_bench_sds(args)

    from scoredistill.config import ConfigError
    from scoredistill.teachers.gmm import PRESETS

    recipes = discover(_recipe_dir(args))
    methods = _split(args.methods) or list(recipes)
    for m in methods:
        if m not in recipes:
            raise ConfigError("--methods", f"no recipe for {m!r}; accepted: {', '.join(recipes)}")
    teachers = _split(args.teachers) or list(SUITES[args.suite])
    for t in teachers:
        if t not in PRESETS:
            raise ConfigError("--teachers", f"unknown preset {t!r}; accepted: {', '.join(PRESETS)}")
    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError:
        raise ConfigError("--seeds", f"must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ConfigError("--seeds", "needs at least one seed")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", "must be >= 1")
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        raise ConfigError("--budget-seconds", "must be > 0")
    if args.n_eval < 16:
        raise ConfigError("--n-eval", "must be >= 16")
    budget = (f"{args.steps} steps per run" if args.steps else
              f"{args.budget_seconds if args.budget_seconds is not None else DEFAULT_BUDGET_S:g} s of training per run "
              "(steps derived from timed iterations)")
    command = _command(args, methods, teachers, seeds)
    header = ["# scoredistill toy bench", "", f"- command: `{command}`", f"- budget: {budget}; seeds {seeds}; "
              f"{args.n_eval} evaluation samples; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
              "- non-finite: samples of the final generator that are NaN/Inf / training steps skipped by the guard",
              "- metrics: precision (inside the 99.9 % radius of a component), modes holding >= 10 % of their "
              "share, weight TV between the precise samples' component frequencies and the weights, sliced W2"]
    out = args.out
    os.makedirs(out, exist_ok=True)
    rows = []
    total = len(methods) * len(teachers) * len(seeds)
    i = 0
    key = {"steps": args.steps, "budget": args.budget_seconds, "set": list(args.set), "n_eval": args.n_eval}
    for teacher in teachers:
        for seed in seeds:
            rows.append(floor_row(teacher, args.n_eval, seed))
        for method in methods:
            recipe, _ = recipes[method]
            for seed in seeds:
                i += 1
                run_dir = os.path.join(out, "runs", f"{method}__{teacher}__s{seed}")
                cache = os.path.join(out, "runs", f"{method}__{teacher}__s{seed}.json")
                row = None
                if not args.fresh and os.path.exists(cache):
                    with open(cache) as f:
                        saved = json.load(f)
                    if saved.get("key") == key:
                        row = saved["row"]
                if row is None:
                    plot = os.path.join(out, "plots", f"{method}__{teacher}.png") if seed == seeds[0] else None
                    row = run_one(method, recipe, teacher, seed, args, run_dir, plot)
                    with open(cache, "w") as f:
                        json.dump({"key": key, "row": row}, f)
                rows.append(row)
                msg = row["status"] if not row["status"].startswith("ok") else (
                    f"precision {row['precision']:.3f}, modes {row['modes_covered']}/{row['num_modes']}, "
                    f"TV {row['weight_tv']:.3f}, SW2 {row['sw2']:.3f}, {row['steps']} steps")
                print(f"[{i}/{total}] {method} on {teacher} (seed {seed}): {msg} ({row['wall_s']} s)", flush=True)
                write_tables(rows, out, header)
    write_tables(rows, out, header)
    print(f"wrote {os.path.join(out, 'results.md')} and results.csv")


def _cmd_bench_sds(args):
    """``--suite sds``: every optimize objective on particles under the GMM teachers, same steps and seed."""
    from scoredistill.config import ConfigError
    from scoredistill.optimize.bench import run_sds_suite

    if args.budget_seconds is not None:
        raise ConfigError("--budget-seconds", "the sds suite takes a fixed --steps budget (default 600)")
    seeds = _split(args.seeds) or ["0"]
    try:
        seed = int(seeds[0])
    except ValueError:
        raise ConfigError("--seeds", f"must be an integer, got {args.seeds!r}") from None
    rows = run_sds_suite(args.out, methods=_split(args.methods), budget_steps=args.steps or 600, seed=seed,
                         teachers=_split(args.teachers) or None, recipes=args.recipes)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'results.md')}")
