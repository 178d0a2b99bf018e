"""The toy suite: every generator recipe on every toy teacher, same budget and seeds.

For each recipe ``recipes/toy/<method>.yaml`` whose objective is registered, and each teacher preset,
the recipe is run with only ``teacher.preset`` (and the seed) changed. The training length is either
fixed (``steps``) or derived from a wall-clock budget (``budget_seconds``): a few iterations are timed
and ``train.steps`` is set so the run takes about that long (the derived steps are written to the
table, so a run can be repeated exactly with ``--steps``; the calibration iterations count as
training). On a shared machine the derived steps follow the load at calibration time. Recipes that
cannot run on a teacher (e.g. they need class labels) get a row saying why.

Outputs under ``out``: ``results.csv`` (one row per run), ``results.md`` (one table per teacher with the
exact-sample floor first), ``plots/<method>__<teacher>.png`` (target vs student), and
``runs/<method>__<teacher>__s<seed>/`` (the run folder) with ``runs/<...>.json`` (its result row, so an
interrupted bench continues where it stopped; ``fresh=True`` reruns everything).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from scoredistill.bench.tables import Column, key, markdown_table, write_tables
from scoredistill.errors import ConfigError, TrainingAborted

TEACHERS = ("ring8", "grid25", "pair", "asym", "gmm16d")
DEFAULT_BUDGET_S = 30.0
COLUMNS = ["method", "objective", "teacher", "seed", "steps", "precision", "modes_covered", "num_modes", "weight_tv",
           "sw2", "mmd", "spread_ratio", "within_std", "within_std_min", "mass_ratio_min", "non_finite",
           "skipped_steps", "wall_s", "status"]
METRICS = ("precision", "modes_covered", "num_modes", "weight_tv", "sw2", "mmd", "spread_ratio", "within_std",
           "within_std_min", "mass_ratio_min", "non_finite")


def discover(recipe_dir: Path) -> dict[str, tuple[Path, str]]:
    """``{method: (recipe path, objective name)}`` for recipes whose objective is registered."""
    from scoredistill.config import load_yaml
    from scoredistill.objectives import OBJECTIVES

    out = {}
    for path in sorted(Path(recipe_dir).glob("*.yaml")):
        try:
            name = (load_yaml(path).get("objective") or {}).get("name")
        except ConfigError:
            continue
        if name in OBJECTIVES:
            out[path.stem] = (path, name)
    return out


def run_one(method: str, recipe: Path, teacher: str, seed: int, run_dir: str, plot_path: str | None, *,
            steps: int | None = None, budget_seconds: float | None = None, n_eval: int = 2000,
            overrides: Sequence[str] = (), steps_eval: Sequence[int] | None = None, recipe_steps: bool = False) -> dict:
    """Train one recipe on one teacher; returns a result row (never raises for bad combinations). With
    ``steps_eval`` the row also holds ``by_steps``: the metrics of the student sampled with each ``K'`` of its
    steps (bench/steps_eval.py; :func:`expand_steps` turns it into one row per ``K'``). ``recipe_steps``: the
    recipe's own ``train.steps`` (``steps`` and ``budget_seconds`` ignored), evaluated once at the end."""
    from scoredistill.config import load_yaml, resolve
    from scoredistill.engine.distiller import Distiller

    row = {"method": method, "teacher": teacher, "seed": seed, "status": "ok"}
    sets = [f"teacher.preset={teacher}", f"train.seed={seed}", "train.progress=false", "eval.plots=false",
            f"eval.n_samples={n_eval}", "train.checkpoint_every=1000000000", "train.keep_checkpoints=1"]
    if steps:
        sets += [f"train.steps={steps}", f"eval.every={steps}"]
    t0 = time.time()
    try:
        raw = load_yaml(recipe)
        raw.setdefault("teacher", {})
        for k in ("means", "std", "stds", "weights", "classes"):  # the preset replaces an explicit mixture
            raw["teacher"].pop(k, None)
        cfg = resolve(raw, sets + list(overrides))
        row["objective"] = cfg["objective"]["name"]
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        if recipe_steps:  # one evaluation, at the end: the recipe's own eval.every would only add time
            steps = None
            cfg["eval"]["every"] = cfg["train"]["steps"]
        d = Distiller(cfg, run_dir, log=lambda m: None)
        if not steps and not recipe_steps:
            budget = budget_seconds if budget_seconds is not None else DEFAULT_BUDGET_S
            every = cfg["train"]["generator_every"]
            warm = every                      # untimed: first passes pay one-off allocation / lazy-init costs
            calib = every * max(1, -(-10 // every))  # timed: whole update cycles, >= 10 iterations
            for _ in range(warm):
                d.train_step()
            tc = time.time()
            for _ in range(calib):
                d.train_step()
            per_it = (time.time() - tc) / calib
            n_steps = max(warm + calib + 1, int(round(budget / max(per_it, 1e-6))))
            d.cfg["train"]["steps"] = n_steps
            d.cfg["eval"]["every"] = n_steps
        res = d.train()
        row["steps"] = d.cfg["train"]["steps"]
        for k in METRICS:
            row[k] = res.get(k)
        row["skipped_steps"] = int(sum(d.nonfinite.values()))
        if steps_eval:
            row.update(_by_steps(d, steps_eval, method))
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


def _by_steps(d, steps_eval: Sequence[int], method: str) -> dict:
    """``{"student_steps": K, "by_steps": {K': metrics}}`` of a finished Distiller's (EMA) student."""
    from scoredistill.bench.steps_eval import sample_steps, steps_for
    from scoredistill.engine.report import student_steps

    gen = d.student()
    k = student_steps(gen)
    by = {}
    for s in steps_for(steps_eval, k, method):
        m = d.evaluator.metrics(sample_steps(gen, d.eval_z, d.eval_cond, s, d.device), d.eval_cond)
        by[str(s)] = {name: m.get(name) for name in METRICS}
    return {"student_steps": k, "by_steps": by}


def expand_steps(row: dict) -> list[dict]:
    """One row per sampling-step count of ``row["by_steps"]`` (``sampling_steps`` = K', the metrics of that
    sampler); a row without it (no ``--steps-eval``, a floor or n/a row) stays as it is."""
    by = row.get("by_steps")
    if not by:
        return [row]
    base = {k: v for k, v in row.items() if k != "by_steps"}
    return [{**base, **metrics, "sampling_steps": int(s)} for s, metrics in by.items()]


def floor_row(teacher: str, n: int, seed: int) -> dict:
    """The exact-sample floor: the metrics of ``n`` exact teacher samples."""
    from scoredistill.engine.build import build_evaluator, build_teacher

    t, ref = build_teacher({"kind": "gmm", "preset": teacher, "process": {"kind": "edm"}})
    m = build_evaluator(t, ref, seed).floor(n)
    row = {"method": "exact samples (floor)", "objective": "–", "teacher": teacher, "seed": seed, "steps": 0,
           "skipped_steps": 0, "wall_s": 0.0, "status": "ok"}
    row.update({k: m.get(k) for k in METRICS})
    return row


def _ok(row: dict) -> bool:
    return row["status"].startswith("ok")


def _metric(name: str, fmt):
    """A metric cell; runs that did not finish show ``–``."""
    return lambda row: key(name, fmt)(row) if _ok(row) else "–"


MARKDOWN = [
    Column("method", key("method")),
    Column("seed", key("seed")),
    Column("steps", _metric("steps", str)),
    Column("precision ↑", _metric("precision", "{:.3f}".format)),
    Column("modes", lambda r: f"{r['modes_covered']}/{r.get('num_modes')}" if _ok(r) and r.get("modes_covered")
           is not None else "–"),
    Column("weight TV ↓", _metric("weight_tv", "{:.3f}".format)),
    Column("SW2 ↓", _metric("sw2", "{:.3f}".format)),
    Column("within-mode std (narrowest)", lambda r: f"{r['within_std']:.2f} ({r['within_std_min']:.2f})"
           if _ok(r) and r.get("within_std") is not None else "–"),
    Column("lightest mass/weight", _metric("mass_ratio_min", "{:.2f}".format)),
    Column("non-finite (samples / skipped steps)",
           lambda r: f"{key('non_finite')(r)} / {r.get('skipped_steps', 0)}" if _ok(r) else "–"),
    Column("wall (s)", key("wall_s")),
    Column("note", lambda r: "" if _ok(r) else r["status"].replace("|", "/")),
]


SAMPLING = Column("sampling steps", lambda r: f"{r['sampling_steps']} of {r['student_steps']}"
                  if r.get("sampling_steps") is not None else "–")
STEPS_COLUMNS = ["sampling_steps", "student_steps"]  # CSV fields added by --steps-eval


def _has_steps(rows: list[dict]) -> bool:
    return any(r.get("sampling_steps") is not None for r in rows)


def markdown(rows: list[dict], header: list[str]) -> list[str]:
    """``header``, then one table per teacher (in order of first appearance); rows of a ``--steps-eval``
    bench get a "sampling steps" column (K' of the student's K) after the method."""
    md = list(header)
    columns = MARKDOWN
    if _has_steps(rows):
        i = next(j for j, c in enumerate(MARKDOWN) if c.title == "method") + 1
        columns = MARKDOWN[:i] + [SAMPLING] + MARKDOWN[i:]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        md += ["", f"### {teacher}", ""] + markdown_table([r for r in rows if r["teacher"] == teacher], columns)
    return md


def csv_columns(rows: list[dict]) -> list[str]:
    return COLUMNS + STEPS_COLUMNS if _has_steps(rows) else COLUMNS


def run_toy_suite(out: str, recipes: dict[str, tuple[Path, str]], methods: Sequence[str], teachers: Sequence[str],
                  seeds: Sequence[int], *, steps: int | None = None, budget_seconds: float | None = None,
                  n_eval: int = 2000, overrides: Sequence[str] = (), fresh: bool = False,
                  header: Sequence[str] = (), log=print, steps_eval: Sequence[int] | None = None,
                  recipe_steps: bool = False) -> list[dict]:
    """Run every (teacher, method, seed) of the suite, reusing finished runs unless ``fresh``; write the
    tables after each run and return the rows (floor rows included). ``steps_eval`` (K' list) gives each
    few-step student one row per K' (a one-step student its one row)."""
    os.makedirs(out, exist_ok=True)
    rows = []
    total = len(methods) * len(teachers) * len(seeds)
    i = 0
    cache_key = {"steps": steps, "budget": budget_seconds, "set": list(overrides), "n_eval": n_eval}
    if recipe_steps:  # only then: runs cached by a bench without it stay valid
        cache_key["recipe_steps"] = True
    if steps_eval:  # only then: the runs cached by a bench without it stay valid
        cache_key["steps_eval"] = list(steps_eval)
    for teacher in teachers:
        for seed in seeds:
            rows.append(floor_row(teacher, n_eval, seed))
        for method in methods:
            recipe, _ = recipes[method]
            for seed in seeds:
                i += 1
                run_dir = os.path.join(out, "runs", f"{method}__{teacher}__s{seed}")
                cache = os.path.join(out, "runs", f"{method}__{teacher}__s{seed}.json")
                row = None
                if not fresh and os.path.exists(cache):
                    with open(cache) as f:
                        saved = json.load(f)
                    if saved.get("key") == cache_key:
                        row = saved["row"]
                if row is None:
                    plot = os.path.join(out, "plots", f"{method}__{teacher}.png") if seed == seeds[0] else None
                    row = run_one(method, recipe, teacher, seed, run_dir, plot, steps=steps,
                                  budget_seconds=budget_seconds, n_eval=n_eval, overrides=overrides,
                                  steps_eval=steps_eval, recipe_steps=recipe_steps)
                    os.makedirs(os.path.dirname(cache), exist_ok=True)  # a run refused before its folder
                    with open(cache, "w") as f:
                        json.dump({"key": cache_key, "row": row}, f)
                for r in expand_steps(row):
                    rows.append(r)
                    msg = r["status"] if not _ok(r) else (
                        f"precision {r['precision']:.3f}, modes {r['modes_covered']}/{r['num_modes']}, "
                        f"TV {r['weight_tv']:.3f}, SW2 {r['sw2']:.3f}, {r['steps']} steps")
                    if r.get("sampling_steps") is not None:
                        msg += f", sampled with {r['sampling_steps']} of {r['student_steps']} steps"
                    if log:
                        log(f"[{i}/{total}] {method} on {teacher} (seed {seed}): {msg} ({r['wall_s']} s)")
                write_tables(out, rows, csv_columns(rows), markdown(rows, list(header)))
    write_tables(out, rows, csv_columns(rows), markdown(rows, list(header)))
    return rows
