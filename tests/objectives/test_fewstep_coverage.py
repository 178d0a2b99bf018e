"""4-step coverage of ring8 and gmm10d by every few-step method (docs/results/toy.md, "4-step coverage on ring8
and gmm10d"): each method's recipe (``recipes/toy/<method>.yaml``; ``disback`` and ``flash_dmd`` with
``generator.steps: 4``) distils the exact-score teacher into a 4-step student with 128-wide 3-block MLPs (student,
experts and fake), one thread, at the budget below, and must cover every mode with a precision floor.

Thresholds come from the configs below over train.seed 0 / 1 / 2 (MEASURED, 2026-12-01, one thread, a loaded
2-core machine; seeded CPU training is bit-stable on one machine, the seed spread stands in for the spread across
machines). Each floor is the lowest of the three seeds less 0.07, the margin of the former
tests/objectives/test_fewstep_distribution.py: the seed-to-seed spread is 0.03-0.18 (largest: disback on ring8),
so the floor sits about half the widest spread below the worst seed seen.

Most cases train for minutes on a loaded machine, so they run only with ``SCOREDISTILL_LONG_TESTS=1``; the
CI cases (``ci=True``, ``slow``) are the cheapest ones. The pairs in ``KNOWN_SHORT`` do not reach every mode with a
useful precision at the test's settings; they are asserted at their recipes' own networks and budgets instead
(``RECIPE_BUDGET``), where they cover every mode on every seed but are wide.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest

from scoredistill.config import load_yaml, resolve
from scoredistill.engine.distiller import Distiller

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "toy"
NET = {"width": 128, "depth": 3}
# the recipe's student is one-step for these two: the coverage claim is about their 4-step students
FOUR_STEPS = {"disback": ["generator.steps=4"], "flash_dmd": ["generator.steps=4"]}


@dataclass(frozen=True)
class Case:
    steps: int                 # train.steps (generator.init_steps included)
    measured: tuple            # precision at train.seed 0, 1, 2 (every seed covered every mode)
    ci: bool = False           # run without SCOREDISTILL_LONG_TESTS
    recipe_nets: bool = False  # the recipe's own 256 x 4 networks instead of the test's 128 x 3

    @property
    def floor(self) -> float:
        # the lowest seed less 0.07, or half of it where that would leave no floor (the wide students below)
        return round(max(min(self.measured) - 0.07, min(self.measured) / 2), 3)


# (method, teacher): budget, precision at seeds 0 / 1 / 2 (all modes covered on every seed), CI or opt-in.
# dmd2_4step / sid_4step on ring8 are the former tests/objectives/test_fewstep_distribution.py cases (their
# configs were these recipes at 128 x 3; seed 0 reproduces their numbers bit for bit). tdm's budget includes the
# recipe's 300 iterations of teacher score matching (generator.init_steps).
MEASURED: dict[tuple[str, str], Case] = {
    ("dmd2_4step", "ring8"): Case(1000, (0.8695, 0.731, 0.7975), ci=True),
    ("sid_4step", "ring8"): Case(600, (0.8405, 0.8515, 0.9105), ci=True),
    ("tdm", "ring8"): Case(1300, (0.9145, 0.906, 0.888), ci=True),
    ("tdm", "gmm10d"): Case(1300, (0.5925, 0.6485, 0.6835)),
    ("phased_dmd", "ring8"): Case(1300, (0.954, 0.9415, 0.9285)),
    ("phased_dmd", "gmm10d"): Case(1300, (0.807, 0.8075, 0.825)),
    ("disback", "ring8"): Case(1000, (0.799, 0.8455, 0.666)),
    ("flash_dmd", "ring8"): Case(1000, (0.638, 0.565, 0.6625)),
}
# Short at the test's 128 x 3 settings (docs/results/toy.md): on gmm10d the 4-step students of dmd2_4step
# (1000 it, seed 0: 4/5 modes, precision 0.176) and disback (1000 it: 4/5, 0.141) drop a mode; sid_4step (600 it:
# 5/5, 0.141) and flash_dmd (1000 it: 5/5, 0.025) keep every mode but are wide (most samples outside the modes'
# precision radius). At the recipes' own networks and budgets (RECIPE_BUDGET, measured 2026-12-02 with this file's
# `distill`) they keep every mode on every seed, still wide (within-mode std 1.41-1.51): backward simulation
# matches the mixture of the steps' outputs to the data, and in 10-D the steps compensate one another instead of
# each matching it. Those cases assert coverage and a precision floor of half the lowest seed.
KNOWN_SHORT = {("dmd2_4step", "gmm10d"), ("disback", "gmm10d"), ("sid_4step", "gmm10d"), ("flash_dmd", "gmm10d")}
RECIPE_BUDGET: dict[tuple[str, str], Case] = {
    ("sid_4step", "gmm10d"): Case(600, (0.092, 0.072, 0.081), recipe_nets=True),        # 42-46 CPU s each
    ("dmd2_4step", "gmm10d"): Case(3000, (0.4405, 0.346, 0.494), recipe_nets=True),     # 113-122 CPU s each
    ("disback", "gmm10d"): Case(3000, (0.386, 0.299, 0.3185), recipe_nets=True),       # 116-122 CPU s each
    ("flash_dmd", "gmm10d"): Case(3000, (0.1815, 0.1885, 0.21), recipe_nets=True),     # 212-222 CPU s each
}


def config(method: str, preset: str, steps: int, seed: int = 0, recipe_nets: bool = False) -> dict:
    """The recipe of ``method`` on ``preset`` with the test's networks (or the recipe's own), budget, seed and
    one thread."""
    raw = load_yaml(RECIPES / f"{method}.yaml")
    sets = [f"teacher.preset={preset}", f"train.seed={seed}", f"train.steps={steps}", "train.threads=1",
            "train.progress=false", "train.checkpoint_every=100000", "eval.every=100000", "eval.n_samples=2000",
            "eval.plots=false"] + FOUR_STEPS.get(method, [])
    if not recipe_nets:
        sets += [f"{net}.{k}={v}" for net in ("generator", "fake_score") for k, v in NET.items()]
    return resolve(raw, sets)


def distill(tmp_path, method: str, preset: str, steps: int, seed: int = 0, recipe_nets: bool = False) -> dict:
    cfg = config(method, preset, steps, seed, recipe_nets)
    res = Distiller(cfg, str(tmp_path / f"{method}_{preset}_{seed}"), log=lambda *a: None).run()
    return {k: res[k] for k in ("precision", "modes_covered", "num_modes", "weight_tv", "sw2", "within_std",
                                "non_finite")}


def _params():
    cases = [(key, case, "") for key, case in MEASURED.items()]
    cases += [(key, case, "-recipe") for key, case in RECIPE_BUDGET.items()]
    for (method, preset), case, tag in sorted(cases):
        marks = [pytest.mark.slow]
        if not case.ci:
            marks.append(pytest.mark.long)  # minutes of training on a loaded 2-core box
        yield pytest.param(method, preset, case, marks=marks, id=f"{method}-{preset}{tag}")


@pytest.mark.parametrize("method,preset,case", list(_params()))
def test_4_step_student_covers_every_mode(tmp_path, method, preset, case):
    seen = distill(tmp_path, method, preset, case.steps, recipe_nets=case.recipe_nets)
    nets = "recipe networks" if case.recipe_nets else "128 x 3"
    msg = f"{method} 4-step on {preset}, {nets}, {case.steps} it, train.seed 0, 1 thread: {seen}"
    print(msg)
    assert seen["non_finite"] == 0, msg
    assert seen["modes_covered"] == seen["num_modes"], msg
    assert seen["precision"] >= case.floor, msg


def test_every_few_step_recipe_has_a_case_or_a_measured_shortfall_on_both_teachers():
    methods = {"dmd2_4step", "sid_4step", "tdm", "phased_dmd", "disback", "flash_dmd"}
    assert {(m, p) for m in methods for p in ("ring8", "gmm10d")} == set(MEASURED) | KNOWN_SHORT
    assert not set(MEASURED) & KNOWN_SHORT
    assert set(RECIPE_BUDGET) == KNOWN_SHORT  # every shortfall at the test's settings is asserted at the recipe's


def test_configs_are_4_step_students_of_the_recipes():
    for method, preset in set(MEASURED) | KNOWN_SHORT:
        cfg = config(method, preset, 1000)
        assert cfg["generator"]["steps"] == 4 and cfg["teacher"]["preset"] == preset
        assert cfg["generator"]["width"] == NET["width"] and cfg["fake_score"]["depth"] == NET["depth"]
