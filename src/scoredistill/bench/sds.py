"""The SDS suite: every optimize objective on particles under the GMM teachers, one budget, one seed.

:func:`run_sds_suite` runs each recipe of ``recipes/optimize`` (``sds, asd, csd, ism, tsm, cds, bsd,
vsd_particles, esd``) with its own objective / fake-score / optimizer settings, swapping only the teacher
(``ring8``, ``pair``, ``gmm10d`` unconditional; ``ring8_cond`` with ``params.classes: uniform``, the
class playing the prompt), the particle count and the step budget. An objective that declares the
``class_conditional`` requirement (CSD, BSD: they are defined by their class terms) runs on the
conditional teacher only; every other method runs on all four.

Budget: ``budget_steps`` optimizer steps per run. Every step-valued schedule of the recipe
(``[start_step, start, end, end_step]`` or ``{start_step, end_step}``) and every objective parameter whose
Params key is declared as a step count (``key(..., unit="steps")``, e.g. ISM/TSM's ``warmup_iter``)
is rescaled by ``budget_steps / recipe steps``, so the run follows the recipe's schedule shape compressed
to the budget.

Reported per (method, teacher): sliced W2 to the teacher and the exact-sample floor (SW2 of ``n`` exact
samples, same seed), spread ratio (sample std / target std), cluster spread (within-cluster std / target
std: 0 = collapse onto points), modes covered, precision, class accuracy (conditional teacher), drift
(mean per-step distance moved by a particle over the last 10 % of steps) and radius growth (mean norm at the
end minus at 90 % of the budget), non-finite particles + skipped steps, and wall time. Outputs in
``out_dir``: ``results.csv``, ``results.md`` and ``scatter/<method>__<teacher>.png``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import torch

from scoredistill.bench.tables import Column, markdown_table, write_tables
from scoredistill.config import keys, load_yaml
from scoredistill.optimize.schedule import extract_schedules, parse_schedule

METHODS = ("sds", "asd", "csd", "ism", "tsm", "cds", "bsd", "vsd_particles", "esd")
TEACHERS = ("ring8", "pair", "gmm10d", "ring8_cond")
CONDITIONAL = {"ring8_cond"}
COLUMNS = ("method", "teacher", "steps", "n", "sw2", "sw2_floor", "spread_ratio", "cluster_spread_ratio",
           "modes_covered", "num_modes", "precision", "class_accuracy", "drift_per_step", "radius_growth",
           "radius_mean", "nonfinite", "wall_s")
STEP_UNIT = "steps"  # a Params key declared with unit="steps": an integer number of optimizer steps


def recipes_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "recipes" / "optimize"


def _recipe(method: str, recipes: Path | None) -> dict:
    return copy.deepcopy(load_yaml(str((recipes or recipes_dir()) / f"{method}.yaml")))


def _scale_schedules(node, factor: float, path: str = ""):
    """Rescale the step fields of every schedule in ``node`` (a config subtree) by ``factor``."""
    if isinstance(node, dict):
        if node.get("kind") in ("linear", "sqrt", "step") and "end_step" in node:
            out = dict(node)
            for k in ("start_step", "end_step"):
                if k in out:
                    out[k] = int(round(out[k] * factor))
            return out
        return {k: _scale_schedules(v, factor, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, list) and len(node) == 4:
        try:
            ok = parse_schedule(node, path or "schedule") is not None
        except Exception:
            ok = False
        if ok:
            return [int(round(node[0] * factor)), node[1], node[2], int(round(node[3] * factor))]
    return node


def step_count_params(objective_name: str) -> list[str]:
    """The objective's parameters that count optimizer steps (Params keys declared ``unit="steps"``)."""
    from scoredistill.objectives import OBJECTIVES

    cls = OBJECTIVES[objective_name]
    return [k.name for k in keys(cls.Params).values() if k.unit == STEP_UNIT]


def _scale_step_params(obj: dict, factor: float) -> dict:
    obj = dict(obj)
    for k in step_count_params(obj.get("name")):
        if isinstance(obj.get(k), int) and not isinstance(obj[k], bool):
            obj[k] = int(round(obj[k] * factor))
    return obj


def rescale_recipe(raw: dict, budget_steps: int) -> dict:
    """``raw`` with its objective's step-valued schedules and step-count parameters and its ``train.lr`` /
    ``train.fake_lr`` schedules rescaled from the recipe's ``train.steps`` to ``budget_steps``."""
    f = budget_steps / int(raw.get("train", {}).get("steps", 1000))
    raw["objective"] = _scale_step_params(_scale_schedules(raw.get("objective", {}), f, "objective"), f)
    tr = raw.setdefault("train", {})
    for k in ("lr", "fake_lr"):
        if k in tr:
            tr[k] = _scale_schedules(tr[k], f, f"train.{k}")
    return raw


def check_known(values, accepted, what: str) -> None:
    """``ValueError`` naming the values of ``values`` that are not in ``accepted``."""
    unknown = sorted(set(values or ()) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; accepted: {', '.join(accepted)}")


def needs_classes(method: str, recipes: Path | None = None) -> bool:
    """Whether the recipe's objective declares the ``class_conditional`` requirement."""
    from scoredistill.objectives.base import build_objective

    raw = _recipe(method, recipes)
    section, _ = extract_schedules(raw.get("objective", {}), "objective")
    convention = raw.get("teacher", {}).get("guidance_convention", "canonical")
    return "class_conditional" in build_objective(section, convention).requirements()


def bench_config(method: str, teacher: str, budget_steps: int, n: int, seed: int, recipes: Path | None = None) -> dict:
    """The resolved config of one (method, teacher) run: the recipe with the teacher, particle count,
    seed and budget replaced."""
    from scoredistill.optimize.config import resolve

    raw = rescale_recipe(_recipe(method, recipes), budget_steps)
    tr = raw["train"]
    tcfg = dict(raw.get("teacher", {}))
    tcfg.update({"kind": "gmm", "preset": teacher})
    raw["teacher"] = tcfg
    p = dict(raw.get("params", {}))
    p.update({"kind": "particles", "n": n, "shape": None,
              "classes": "uniform" if teacher in CONDITIONAL else None})
    raw["params"] = p
    tr.update({"steps": budget_steps, "seed": seed, "progress": False, "threads": None,
               "checkpoint_every": budget_steps, "log_every": budget_steps})
    raw["eval"] = {"every": budget_steps, "plots": False}
    return resolve(raw)


def pairs(methods=None, teachers=None, recipes: Path | None = None) -> list[tuple[str, str]]:
    """The (method, teacher) runs of the suite: class-conditional objectives on conditional teachers only."""
    out = []
    for m in methods or METHODS:
        cond_only = needs_classes(m, recipes)
        for t in teachers or TEACHERS:
            if cond_only and t not in CONDITIONAL:
                continue
            out.append((m, t))
    return out


def run_one(method: str, teacher: str, out_dir: str, budget_steps: int, n: int, seed: int, recipes=None,
            plots: bool = True) -> dict:
    from scoredistill.metrics.gmm import gmm_metrics
    from scoredistill.optimize.driver import PriorOptimizer
    from scoredistill.optimize.metrics import optimize_metrics

    cfg = bench_config(method, teacher, budget_steps, n, seed, recipes)
    t0 = time.time()
    opt = PriorOptimizer(cfg, None, log=lambda *a: None)
    tail_start = budget_steps - max(1, budget_steps // 10)
    prev = None
    moved, radius_tail = [], None
    while opt.step < budget_steps:
        if opt.step >= tail_start:
            with torch.no_grad():
                cur = opt.param.x.detach().clone()
            if prev is None:
                radius_tail = float(cur.reshape(len(cur), -1).norm(dim=1).mean())
            prev = cur
        opt.train_step()
        if prev is not None:
            d = (opt.param.x.detach() - prev).reshape(len(prev), -1).norm(dim=1)
            d = d[torch.isfinite(d)]
            moved.append(float(d.mean()) if len(d) else float("nan"))
    wall = time.time() - t0
    x, cond = opt.render_all()
    ref = opt.reference
    res = optimize_metrics(x, ref, cond, seed=seed)
    exact = ref.sample(len(x), generator=torch.Generator().manual_seed(seed + 12345))
    floor = gmm_metrics(exact, ref, seed=seed)["sw2"]
    row = {"method": method, "teacher": teacher, "steps": budget_steps, "n": len(x),
           "sw2": res.get("sw2"), "sw2_floor": floor, "spread_ratio": res.get("spread_ratio"),
           "cluster_spread_ratio": res.get("cluster_spread_ratio"), "modes_covered": res.get("modes_covered"),
           "num_modes": res.get("num_modes"), "precision": res.get("precision"),
           "class_accuracy": res.get("class_accuracy"),
           "drift_per_step": sum(moved) / len(moved) if moved else float("nan"),
           "radius_growth": res["radius_mean"] - radius_tail if radius_tail is not None else float("nan"),
           "radius_mean": res["radius_mean"],
           "nonfinite": int(res.get("non_finite", 0)) + int(sum(opt.nonfinite.values())),
           "wall_s": wall}
    if plots:
        from scoredistill.viz import scatter_panels

        refs = ref.sample(max(len(x), 500), generator=torch.Generator().manual_seed(1))
        scatter_panels([("target (exact)", refs), (f"{method} ({budget_steps} steps)", x)],
                       os.path.join(out_dir, "scatter", f"{method}__{teacher}.png"), means=ref.means,
                       basis_from=refs, title=f"{method} on {teacher}")
    return row


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _cell(name: str):
    return lambda row: _fmt(row.get(name))


MARKDOWN = [Column(title, _cell(name)) for name, title in (
    ("method", "method"), ("teacher", "teacher"), ("sw2", "SW2"), ("sw2_floor", "SW2 floor"),
    ("spread_ratio", "spread"), ("cluster_spread_ratio", "cluster spread"))]
MARKDOWN.append(Column("modes", lambda r: f"{r.get('modes_covered')}/{r.get('num_modes')}"))
MARKDOWN += [Column(title, _cell(name)) for name, title in (
    ("precision", "precision"), ("class_accuracy", "class acc"), ("drift_per_step", "drift/step"),
    ("radius_growth", "Δradius (last 10 %)"), ("nonfinite", "non-finite"), ("wall_s", "wall s"))]


def write_results(rows: list[dict], out_dir: str, header: str = "") -> None:
    lines = [header, ""] if header else []
    write_tables(out_dir, rows, COLUMNS, lines + markdown_table(rows, MARKDOWN))


def run_sds_suite(out_dir: str, methods=None, budget_steps: int = 600, seed: int = 0, teachers=None,
                  n: int = 256, recipes: str | None = None, plots: bool = True, log=print) -> list[dict]:
    """Run every (method, teacher) pair (see the module docstring); write ``results.csv``, ``results.md``
    and one scatter PNG per pair under ``out_dir``; return the rows (dicts with :data:`COLUMNS`)."""
    check_known(methods, METHODS, "method")
    check_known(teachers, TEACHERS, "teacher")
    os.makedirs(out_dir, exist_ok=True)
    rec = Path(recipes) if recipes else None
    rows = []
    t0 = time.time()
    for m, t in pairs(methods, teachers, rec):
        row = run_one(m, t, out_dir, budget_steps, n, seed, rec, plots)
        rows.append(row)
        if log:
            log(f"{m:>14} {t:>10}: sw2 {row['sw2']:.3f} (floor {row['sw2_floor']:.3f}) spread "
                f"{row['spread_ratio']:.2f} modes {row['modes_covered']}/{row['num_modes']} "
                f"{row['wall_s']:.1f} s")
        write_results(rows, out_dir, _header(budget_steps, n, seed, time.time() - t0))
    return rows


def _header(budget_steps, n, seed, total) -> str:
    return (f"# SDS bench: {n} particles, {budget_steps} steps, seed {seed}, total wall {total:.0f} s\n\n"
            "SW2 floor: sliced W2 of as many exact samples (same seed). Spread: sample std / target std; "
            "cluster spread: within-cluster std / target std (0: collapse onto points). Drift/step: mean "
            "distance a particle moves per step over the last 10 % of steps; Δradius: mean norm at the end "
            "minus at 90 % of the budget. Non-finite: non-finite particles + skipped steps.")
