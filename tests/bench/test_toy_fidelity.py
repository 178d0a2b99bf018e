"""Toy fidelity of the dmd, dmd2 and sid recipes at their own budgets (issue 17): on ``asym`` (four modes of
weight 0.45 / 0.3 / 0.15 / 0.1 and std 0.3 / 0.2 / 0.15 / 0.1) and ``gmm16d`` (eight equal modes in 16-D) the
one-step student's modes have the teacher's width (pooled within-mode std ratio in [0.85, 1.15], two-sided: too
sharp and too wide both fail) and every mode of weight >= 5 % holds at least a tenth of its share of the
precise samples (the quality bar of benchmarks/toy_time_to_quality.py, docs/results/toy.md "Time to quality").

Each case trains ``recipes/toy/<method>.yaml`` unchanged except ``teacher.preset`` and the seed, one thread,
and scores the EMA generator's samples on 2000 fixed noise draws. Measurements per case are in ``CASES``; the
thresholds are the issue's bar, met by every measured seed (lowest within-mode std 0.871, highest 1.055). Time:
12-74 CPU seconds per case on the loaded 2-core development box, so all six run with the slow tests.

Seeded CPU training is bit-stable on one machine only: the same code gave sid on asym 1.004 / 1.044 / 1.018 at
1200 iterations on the machine of the first measurement and 1.198 / 1.093 / 1.049 / 0.977 / 1.074 (seeds 0-4) on
the next one (2026-12-02, an AMD EPYC), where its modes widen after the regression warm-up and settle
later; so the sid recipe now runs 2400 iterations, measured on the second machine (docs/results/toy.md, "Sixth
study"). dmd2 on asym there: 0.912 / 0.965 / 1.058 (seeds 1-3), 4/4 each.
"""

import os

import pytest
import torch
from tests.helpers import repro

from scoredistill.config import load_yaml, resolve
from scoredistill.engine.build import build_teacher
from scoredistill.engine.distiller import Distiller
from scoredistill.metrics.gmm import LIGHT_WEIGHT, gmm_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "toy")
WITHIN_STD = (0.85, 1.15)

#: (method, teacher) -> measured 2026-12-01 at the recipe's budget, train.seed 0 / 1 / 2, one thread: within-mode
#: std ratio and modes (CPU seconds of training per run on the loaded 2-core box; dmd2 measured 2026-12-02 with its
#: regression warm-up; sid 2026-12-02 with its own, docs/results/toy.md "Fourth study").
CASES = {
    ("dmd", "asym"): "1000 it: 0.948 / 0.980 / 0.927, 4/4 each (15-16 s)",
    ("dmd", "gmm16d"): "1000 it: 0.919 / 0.951 / 0.942, 8/8 each (15-17 s)",
    ("dmd2", "asym"): "1000 it: 0.933 / 0.927 / 0.871, 4/4 each (12 s; time_embedding fourier, 2026-12-02)",
    ("dmd2", "gmm16d"): "1000 it: 0.971 / 0.957 / 0.944, 8/8 each (12-13 s; time_embedding fourier, 2026-12-02)",
    ("sid", "asym"): "2400 it: 1.048 / 1.052 / 1.020 / 1.055 (seeds 0-3), 4/4 each (68-70 s; 2026-12-02)",
    ("sid", "gmm16d"): "2400 it: 0.952 / 0.952 / 0.949, 8/8 each (65-74 s; 2026-12-02)",
}


def distill(method: str, preset: str, seed: int = 0) -> tuple[dict, dict, torch.Tensor]:
    cfg = resolve(load_yaml(os.path.join(RECIPES, f"{method}.yaml")),
                  [f"teacher.preset={preset}", f"train.seed={seed}", "train.progress=false", "train.threads=null",
                   "eval.plots=false"])
    teacher, _ = build_teacher(cfg["teacher"])
    d = Distiller(cfg, None, log=lambda *a: None)
    for _ in range(cfg["train"]["steps"]):
        d.train_step()
    z = torch.randn(2000, teacher.dim, generator=torch.Generator().manual_seed(12345))
    return cfg, gmm_metrics(d.sample(z), teacher, seed=0), teacher.weights


@pytest.mark.parametrize("method,preset", sorted(CASES))
def test_recipe_student_has_the_teachers_mode_widths_and_every_mode(method, preset):
    cfg, m, weights = distill(method, preset)
    mass = torch.tensor(m["component_mass"], dtype=torch.float64)
    w = weights.double()
    heavy = w >= LIGHT_WEIGHT
    figures = {k: m[k] for k in ("within_std", "within_std_min", "modes_covered", "weight_tv", "precision")}
    msg = repro(cfg, {**figures, "component_mass": m["component_mass"]})
    print(method, preset, msg)
    assert bool((mass[heavy] >= 0.1 * w[heavy]).all()), msg
    assert WITHIN_STD[0] <= m["within_std"] <= WITHIN_STD[1], msg
