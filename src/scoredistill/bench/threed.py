"""The 3D suite: the ``recipes/3d/scene_<method>.yaml`` recipes on exact-render teachers, one budget.

Teachers: ``snowman`` (one scene: does the method reconstruct it?) and ``snowman+dumbbell`` (two
scenes, equal weights: where do ``particles`` splat sets land? ProlificDreamer arXiv 2305.16213
claims VSD's particles cover both scenes while SDS's collapse onto one or a blend); on request
``twotone-janus`` / ``twotone-janus-labels`` (the front-biased Janus prior without / with the view label,
``teacher.janus: 0.9``). Each run is the
recipe with the teacher's scenes, the particle count (1 on one scene, ``particles`` on two), the
seed and the step budget replaced (step-valued schedules and step-count parameters rescaled as in
:mod:`scoredistill.bench.sds`).

Reported per (method, teacher): held-out-view PSNR (dB, turntable at elevation 15, each particle
against its best-matching scene, mean over particles), opacity-weighted Chamfer between Gaussian
centres and that scene's (scene units), the Janus rate (share of side / back views closer to the scene's
front template than to its true view), how many particles land nearest each scene, the Gaussian
count per particle, non-finite skipped steps and wall time. ``overrides`` (``KEY=VALUE``) apply to
every run after the suite's own replacements. Writes ``results.md`` / ``results.csv``
and ``grids/<method>__<teacher>.png``.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

from scoredistill.bench.sds import _fmt, check_known, rescale_recipe
from scoredistill.bench.tables import Column, markdown_table, write_tables
from scoredistill.config import load_yaml

METHODS = ("sds", "vsd", "esd", "ism")
TEACHERS = {"snowman": ["snowman"], "snowman+dumbbell": ["snowman", "dumbbell"], "twotone-janus": ["twotone"],
            "twotone-janus-labels": ["twotone"]}
# the Janus teachers (teachers/scene.py): a front-biased prior, without and with the view label
TEACHER_KEYS = {"twotone-janus": {"janus": 0.9}, "twotone-janus-labels": {"janus": 0.9, "janus_labels": True}}
DEFAULT_TEACHERS = ("snowman", "snowman+dumbbell")
COLUMNS = ("method", "teacher", "objective", "steps", "particles", "psnr", "chamfer", "janus", "per_scene",
           "gaussians", "nonfinite", "wall_s")


def recipes_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "recipes" / "3d"


def bench_config(method: str, teacher: str, budget_steps: int, particles: int, seed: int,
                 recipes: Path | None = None, resolution: int | None = None, overrides=()) -> dict:
    """The resolved config of one (method, teacher) run (see the module docstring)."""
    from scoredistill.optimize.config import resolve

    raw = rescale_recipe(copy.deepcopy(load_yaml(str((recipes or recipes_dir()) / f"scene_{method}.yaml"))),
                         budget_steps)
    tr = raw["train"]
    scenes = TEACHERS[teacher]
    raw["teacher"] = {**raw.get("teacher", {}), "kind": "scene", "scenes": scenes, **TEACHER_KEYS.get(teacher, {})}
    raw["teacher"].pop("weights", None)
    if resolution:
        raw["teacher"]["resolution"] = resolution
    raw["params"] = {**raw.get("params", {}), "n": particles if len(scenes) > 1 else 1}
    tr.update({"steps": budget_steps, "seed": seed, "progress": False, "threads": None,
               "checkpoint_every": budget_steps, "log_every": budget_steps})
    raw["eval"] = {"every": budget_steps, "plots": True}
    return resolve(raw, overrides)


def run_one(method: str, teacher: str, out_dir: str, budget_steps: int, particles: int, seed: int,
            recipes: Path | None = None, resolution: int | None = None, overrides=()) -> dict:
    import tempfile

    from scoredistill.optimize.driver import PriorOptimizer

    cfg = bench_config(method, teacher, budget_steps, particles, seed, recipes, resolution, overrides)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # the run's own grid lands in tmp/samples
        opt = PriorOptimizer(cfg, tmp, log=lambda *a: None)
        res = opt.run()
        grid = os.path.join(tmp, "samples", f"step_{budget_steps:07d}.png")
        if os.path.exists(grid):  # not with --set eval.plots=false
            os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
            shutil.copy(grid, os.path.join(out_dir, "grids", f"{method}__{teacher}.png"))
    k = len(TEACHERS[teacher])
    return {"method": method, "teacher": teacher, "objective": cfg["objective"]["name"], "steps": budget_steps,
            "particles": cfg["params"]["n"], "psnr": res.get("psnr"), "chamfer": res.get("chamfer"),
            "janus": res.get("janus"),
            "per_scene": " / ".join(str(res.get(f"particles_scene{i}", 0)) for i in range(k)),
            "gaussians": res.get("gaussians"), "nonfinite": int(sum(res["nonfinite_skipped"].values())),
            "wall_s": time.time() - t0}


MARKDOWN = [Column(title, (lambda n: lambda r: _fmt(r.get(n)))(name)) for name, title in (
    ("method", "recipe"), ("objective", "objective"), ("teacher", "teacher"), ("steps", "steps"),
    ("particles", "particles"), ("psnr", "held-out PSNR dB"), ("chamfer", "Chamfer"), ("janus", "Janus rate"),
    ("per_scene", "particles per scene"), ("gaussians", "Gaussians"), ("nonfinite", "skipped"),
    ("wall_s", "wall s"))]


def run_3d_suite(out_dir: str, methods=None, teachers=None, budget_steps: int = 300, particles: int = 4,
                 seed: int = 0, recipes: str | None = None, resolution: int | None = None, header=(),
                 overrides=(), log=print) -> list[dict]:
    """Run every (method, teacher) pair; write ``results.md``, ``results.csv`` and the grids."""
    check_known(methods, METHODS, "method")
    check_known(teachers, TEACHERS, "teacher")
    rec = Path(recipes) if recipes else None
    rows = []
    for t in teachers or DEFAULT_TEACHERS:
        for m in methods or METHODS:
            row = run_one(m, t, out_dir, budget_steps, particles, seed, rec, resolution, overrides)
            rows.append(row)
            if log:
                log(f"{m:>5} {t:>17}: psnr {row['psnr']:.2f} chamfer {row['chamfer']:.4f} "
                    f"per scene {row['per_scene']} {row['wall_s']:.0f} s")
            write_tables(out_dir, rows, COLUMNS, list(header) + markdown_table(rows, MARKDOWN))
    return rows
