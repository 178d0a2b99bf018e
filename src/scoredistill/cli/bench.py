"""``scoredistill bench --suite toy|sds|digits|3d``: the command line of the bench suites in
:mod:`scoredistill.bench` (argument checks, defaults and the reproducing command; the suites do the work).

- ``toy`` (:mod:`scoredistill.bench.toy`): every generator recipe on the toy GMM teachers, one budget;
- ``sds`` (:mod:`scoredistill.bench.sds`): every optimize objective on particles, one step budget;
- ``digits`` (:mod:`scoredistill.bench.digits`): the bundled image teacher (``--teachers digits|mnist``) at
  35/9/1 NFE, the real-data floor and the one-step students of the ``--methods`` recipes;
- ``3d`` (:mod:`scoredistill.bench.threed`): the ``recipes/3d/scene_*`` recipes on one- and two-scene
  exact-render teachers (held-out PSNR, Chamfer, particles per scene).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

SUITES = {"toy": ("ring8", "grid25", "pair", "asym", "gmm16d"),
          "sds": ("ring8", "pair", "gmm10d", "ring8_cond"),
          "digits": ("digits",),
          "3d": ("snowman", "snowman+dumbbell")}
DEFAULT_BUDGET_S = 30.0


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="run every toy recipe on the toy teachers with one budget; write tables + plots")
    b.add_argument("--suite", default="toy", choices=sorted(SUITES))
    b.add_argument("--methods", default=None, help="comma-separated recipe names (default: all in the recipe folder; "
                   "digits: none, the teacher rows only)")
    b.add_argument("--teachers", default=None, help=f"comma-separated presets (default: {','.join(SUITES['toy'])}; "
                   "digits: digits or mnist)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--budget-seconds", type=float, default=None,
                   help=f"wall-clock training budget per run (default {DEFAULT_BUDGET_S:g}); sets train.steps")
    g.add_argument("--steps", type=int, default=None, help="fixed train.steps for every run instead of a budget")
    g.add_argument("--recipe-steps", action="store_true",
                   help="toy: train every recipe for its own train.steps (its default budget) instead of a "
                   "wall-clock budget; independent of the machine's load")
    b.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    b.add_argument("--n-eval", type=int, default=2000, help="evaluation samples per run")
    b.add_argument("--recipes", default=None, help="recipe folder (default recipes/<suite>)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every run")
    b.add_argument("--fresh", action="store_true", help="rerun runs that already have a result")
    b.add_argument("--out", default=None, help="output folder (default bench/<suite>)")
    b.add_argument("--steps-eval", default=None, metavar="K1,K2,...",
                   help="toy/digits: sample each few-step student with K' of its K steps (evenly strided from the "
                   "first, docs/fewstep.md), one row per K'; one-step students give their one row")
    b.set_defaults(fn=cmd_bench)


def _recipe_dir(args, suite: str | None = None) -> Path:
    from scoredistill.errors import ConfigError

    suite = suite or args.suite
    if args.recipes:
        d = Path(args.recipes)
    else:
        d = Path("recipes") / suite
        if not d.is_dir():  # running outside the repository root: the checkout next to the package
            d = Path(__file__).resolve().parents[3] / "recipes" / suite
    if not d.is_dir():
        raise ConfigError("--recipes", f"folder not found: {d}")
    return d


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def _seeds(args) -> list[int]:
    from scoredistill.errors import ConfigError

    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError:
        raise ConfigError("--seeds", f"must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ConfigError("--seeds", "needs at least one seed")
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise ConfigError("--seeds", f"seeds must be integers in [0, 2^63), got {bad[0]}")
    return seeds


def _choose(text: str | None, accepted, default, flag: str) -> list[str]:
    from scoredistill.errors import ConfigError

    chosen = _split(text) or list(default)
    for v in chosen:
        if v not in accepted:
            raise ConfigError(flag, f"unknown value {v!r}; accepted: {', '.join(accepted)}")
    return chosen


def _command(args, methods, teachers, seeds) -> str:
    """The command line that reproduces this bench (explicit lists, so it does not depend on defaults)."""
    parts = ["scoredistill bench", f"--suite {args.suite}", f"--methods {','.join(methods)}",
             f"--teachers {','.join(teachers)}"]
    parts.append(f"--steps {args.steps}" if args.steps else "--recipe-steps" if args.recipe_steps else
                 f"--budget-seconds {args.budget_seconds if args.budget_seconds is not None else DEFAULT_BUDGET_S:g}")
    parts += [f"--seeds {','.join(map(str, seeds))}", f"--n-eval {args.n_eval}"]
    if getattr(args, "steps_eval_list", None):
        parts.append(f"--steps-eval {','.join(map(str, args.steps_eval_list))}")
    parts += [f"--set {s}" for s in args.set]
    parts.append(f"--out {args.out}")
    return " ".join(parts)


def _check_out(out: str, claim: bool = False) -> None:
    """The bench folder follows the run-folder rules (docs/cli.md): a new or empty folder, or one a bench wrote
    (marker ``.scoredistill``, or from before the marker: ``results.md`` beside ``runs/``); it is then marked as
    ours (``claim``; checked first without writing). A folder of anything else is refused, since a bench
    replaces ``runs/<run>`` folders inside it."""
    from scoredistill.engine.rundir import is_ours, write_marker
    from scoredistill.errors import ConfigError

    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError("--out", f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not is_ours(out):
        legacy = os.path.isfile(os.path.join(out, "results.md")) and os.path.isdir(os.path.join(out, "runs"))
        if not legacy:
            raise ConfigError("--out", f"{out} is not empty and was not created by scoredistill; nothing in it is "
                              "touched: choose a new or empty folder")
    if not claim:
        return
    os.makedirs(out, exist_ok=True)
    if not is_ours(out):
        write_marker(out, "bench")


def cmd_bench(args):
    from scoredistill.errors import ConfigError

    if args.out is None:
        args.out = os.path.join("bench", args.suite)
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", "must be >= 1")
    if args.budget_seconds is not None and not (math.isfinite(args.budget_seconds) and args.budget_seconds > 0):
        raise ConfigError("--budget-seconds", f"must be a finite number of seconds > 0, got {args.budget_seconds}")
    if args.recipe_steps and args.suite != "toy":
        raise ConfigError("--recipe-steps", f"the {args.suite} suite already trains each recipe for its own steps "
                          "(or --steps); accepted with --suite toy")
    if args.n_eval < 16:
        raise ConfigError("--n-eval", "must be >= 16")
    if args.set and args.suite == "sds":
        raise ConfigError("--set", "the sds suite takes no overrides (its recipes are rescaled to --steps); accepted "
                          "with --suite toy, digits or 3d")
    from scoredistill.config import DISTILL, check_override_values
    from scoredistill.optimize.config import OPTIMIZE

    # a bad value would fail every run of the suite: refused here, before any training
    check_override_values(args.set, OPTIMIZE if args.suite == "3d" else DISTILL)
    _check_out(args.out)
    from scoredistill.bench.steps_eval import parse_steps_eval

    args.steps_eval_list = parse_steps_eval(args.steps_eval)
    if args.steps_eval_list and args.suite not in ("toy", "digits"):
        raise ConfigError("--steps-eval", f"the {args.suite} suite has no generators to sample; accepted with "
                          "--suite toy or digits")
    {"toy": _bench_toy, "sds": _bench_sds, "digits": _bench_digits, "3d": _bench_3d}[args.suite](args)


def _bench_toy(args):
    import torch

    from scoredistill.bench.toy import discover, run_toy_suite
    from scoredistill.teachers.gmm import PRESETS

    recipes = discover(_recipe_dir(args))
    methods = _choose(args.methods, list(recipes), recipes, "--methods")
    teachers = _choose(args.teachers, list(PRESETS), SUITES["toy"], "--teachers")
    seeds = _seeds(args)
    from scoredistill.bench.steps_eval import check_recipes

    check_recipes({m: str(recipes[m][0]) for m in methods}, args.steps_eval_list, args.set)
    budget = (f"{args.steps} steps per run" if args.steps else
              "each recipe's own train.steps" if args.recipe_steps else
              f"{args.budget_seconds if args.budget_seconds is not None else DEFAULT_BUDGET_S:g} s of training per run "
              "(steps derived from timed iterations)")
    header = ["# scoredistill toy bench", "", f"- command: `{_command(args, methods, teachers, seeds)}`",
              f"- budget: {budget}; seeds {seeds}; "
              f"{args.n_eval} evaluation samples; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
              "- non-finite: samples of the final generator that are NaN/Inf / training steps skipped by the guard",
              "- metrics: precision (inside the 99.9 % radius of a component), modes holding >= 10 % of their "
              "share, weight TV between the precise samples' component frequencies and the weights, sliced W2"]
    _check_out(args.out, claim=True)
    run_toy_suite(args.out, recipes, methods, teachers, seeds, steps=args.steps, budget_seconds=args.budget_seconds,
                  recipe_steps=args.recipe_steps,
                  n_eval=args.n_eval, overrides=args.set, fresh=args.fresh, header=header,
                  log=lambda m: print(m, flush=True), steps_eval=args.steps_eval_list)
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.csv")


def _bench_sds(args):
    """Every optimize objective on particles under the GMM teachers, same steps and seed."""
    from scoredistill.bench.sds import METHODS, TEACHERS, run_sds_suite
    from scoredistill.errors import ConfigError

    if args.budget_seconds is not None:
        raise ConfigError("--budget-seconds", "the sds suite takes a fixed --steps budget (default 600)")
    methods = _choose(args.methods, METHODS, (), "--methods")
    teachers = _choose(args.teachers, TEACHERS, (), "--teachers")
    seed = _seeds(args)[0]
    _check_out(args.out, claim=True)
    rows = run_sds_suite(args.out, methods=methods, budget_steps=args.steps or 600, seed=seed,
                         teachers=teachers or None, recipes=args.recipes)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'results.md')}")


def _bench_digits(args):
    """The bundled image teacher at 35/9/1 NFE, the real floor and the ``--methods`` recipes' students."""
    from scoredistill.bench.digits import DATASETS, run_digits_suite
    from scoredistill.errors import ConfigError

    if args.budget_seconds is not None:
        raise ConfigError("--budget-seconds", "the digits suite trains each recipe for its own (or --steps) steps")
    dataset = _choose(args.teachers, DATASETS, SUITES["digits"], "--teachers")
    if len(dataset) != 1:
        raise ConfigError("--teachers", f"the digits suite takes one dataset; accepted: {', '.join(DATASETS)}")
    folder = _recipe_dir(args, dataset[0])
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    methods = _choose(args.methods, available, (), "--methods")
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    from scoredistill.bench.steps_eval import check_recipes

    check_recipes({m: str(folder / f"{m}.yaml") for m in methods}, args.steps_eval_list, overrides)
    _check_out(args.out, claim=True)
    rows = run_digits_suite(dataset[0], n=args.n_eval, seed=_seeds(args)[0],
                            distill=[str(folder / f"{m}.yaml") for m in methods], overrides=overrides,
                            runs=os.path.join(args.out, "runs"), out_dir=args.out,
                            log=lambda m: print(m, flush=True), steps_eval=args.steps_eval_list)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'results.md')}")


def _bench_3d(args):
    """The ``recipes/3d/scene_*`` recipes on one- and two-scene exact-render teachers."""
    import torch

    from scoredistill.bench.threed import METHODS, TEACHERS, run_3d_suite
    from scoredistill.errors import ConfigError

    if args.budget_seconds is not None:
        raise ConfigError("--budget-seconds", "the 3d suite takes a fixed --steps budget (default 300)")
    methods = _choose(args.methods, METHODS, METHODS, "--methods")
    teachers = _choose(args.teachers, list(TEACHERS), SUITES["3d"], "--teachers")
    seed = _seeds(args)[0]
    args.steps = args.steps or 300
    cmd = _command(args, methods, teachers, [seed]).replace(f" --n-eval {args.n_eval}", "")
    header = ["# scoredistill 3d bench", "", f"- command: `{cmd}`",
              f"- {args.steps} steps per run, seed {seed}; two-scene teacher: 4 particles, one-scene: 1; torch "
              f"threads {torch.get_num_threads()}, {os.cpu_count()} CPUs",
              "- held-out PSNR: turntable views at elevation 15 against the best-matching scene (mean over "
              "particles); Chamfer: opacity-weighted, Gaussian centres to that scene's (scene units); Janus rate: "
              "share of side / back views closer to the scene's front template than to its true view; particles "
              "per scene: nearest scene by PSNR", ""]
    _check_out(args.out, claim=True)
    rows = run_3d_suite(args.out, methods, teachers, args.steps, seed=seed, recipes=args.recipes, header=header,
                        overrides=args.set, log=lambda m: print(m, flush=True))
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'results.md')}")
