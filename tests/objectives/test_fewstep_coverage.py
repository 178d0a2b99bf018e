"""4-step coverage of ring8 and gmm10d by every few-step method (docs/results/toy.md, "4-step coverage on ring8
and gmm10d"): each method's recipe (``recipes/toy/<method>.yaml``; ``disback`` and ``flash_dmd`` with
``generator.steps: 4`` and ``TEACHER_START``) distils the exact-score teacher into a 4-step student with 128-wide
3-block MLPs (student, experts and fake), one thread, at the budget below, and must cover every mode with a
precision floor.

Thresholds come from the configs below over train.seed 0 / 1 / 2 (MEASURED, 2026-12-01; the dmd2_4step and
disback cases 2026-12-02; one thread, a loaded 2-core machine; seeded CPU training is bit-stable on one machine, and
the seed spread is meant to stand in for the spread across machines -- it did not for sid_4step on ring8, whose
floor now comes from seven seeds on two machines). Each floor is the lowest of the three seeds less 0.07, the
margin of the former tests/objectives/test_fewstep_distribution.py: the seed-to-seed spread is 0.01-0.10 (largest:
flash_dmd on ring8), so the floor sits at least half the widest spread below the worst seed seen.

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
# the recipe's student is one-step for these two: the coverage claim is about their 4-step students, which start as
# dmd2_4step's does (2026-12-02, docs/results/toy.md "4-step width on gmm10d"): 300 iterations of teacher score
# matching, then a regression on teacher ODE pairs until iteration 800. gmm10d, 2300 it, seeds 0/1/2: disback
# within-mode std 1.05 / 1.05 / 1.03 x, precision 0.85-0.87 (without: 4 of 5 modes, 0.14 at 1000 it); flash_dmd
# 1.19 / 1.24 / 1.12 x, 0.62-0.68 (without: 5/5, 0.025, ~1.45 x at 1000 it).
TEACHER_START = ["generator.init_steps=300", "objective.regression_weight=1", "objective.regression_steps=800"]
FOUR_STEPS = {"disback": ["generator.steps=4"] + TEACHER_START, "flash_dmd": ["generator.steps=4"] + TEACHER_START}


@dataclass(frozen=True)
class Case:
    steps: int                 # train.steps (generator.init_steps included)
    measured: tuple            # precision at train.seed 0, 1, 2 (and more where noted; every seed covered every mode)
    ci: bool = False           # run without SCOREDISTILL_LONG_TESTS
    recipe_nets: bool = False  # the recipe's own 256 x 4 networks instead of the test's 128 x 3

    @property
    def floor(self) -> float:
        # the lowest seed less 0.07, or half of it where that would leave no floor (the wide students below)
        return round(max(min(self.measured) - 0.07, min(self.measured) / 2), 3)


# (method, teacher): budget, precision at seeds 0 / 1 / 2 (all modes covered on every seed; more seeds where
# noted), CI or opt-in.
# sid_4step on ring8 is a former tests/objectives/test_fewstep_distribution.py case (its config was this recipe
# at 128 x 3; seed 0 reproduces its numbers bit for bit). The budgets of tdm, phased_dmd, dmd2_4step and the 4-step
# disback and flash_dmd include their 300 iterations of teacher score matching (generator.init_steps). The cases of
# dmd2_4step, disback and flash_dmd were re-measured 2026-12-02 (torch 2.13.0+cpu; the former dmd2_4step recipe
# gives 0.875 / 0.763 / 0.783 on ring8 at 1000 it there, against 0.8695 / 0.731 / 0.7975 recorded before).
# Within-mode std at 4 steps: gmm10d 1.07-1.12 x (dmd2_4step), 1.03-1.05 x (disback), 1.12-1.24 x (flash_dmd);
# ring8 1.61-1.76 x (the former dmd2_4step recipe: 1.67-1.79 x).
MEASURED: dict[tuple[str, str], Case] = {
    ("dmd2_4step", "ring8"): Case(2300, (0.9015, 0.8905, 0.8945), ci=True),   # 55-58 CPU s each
    ("dmd2_4step", "gmm10d"): Case(2300, (0.8695, 0.838, 0.871)),             # 57-59 CPU s each
    # seeds 0-2 on the first machine, then seeds 0-3 on the next one (2026-12-02, an AMD EPYC, where the former floor
    # 0.771 failed in CI: 0.7625 / 0.675 / 0.8105 / 0.671 at 600 it, within-mode std 1.70-1.92 x; 1200 it gives
    # 0.796 / 0.785 on seeds 0 / 1; docs/results/toy.md "Sixth study"). The floor is the rule's, over all seven.
    ("sid_4step", "ring8"): Case(600, (0.8405, 0.8515, 0.9105, 0.7625, 0.675, 0.8105, 0.671), ci=True),
    ("tdm", "ring8"): Case(1300, (0.9145, 0.906, 0.888), ci=True),
    ("tdm", "gmm10d"): Case(1300, (0.5925, 0.6485, 0.6835)),
    ("phased_dmd", "ring8"): Case(1300, (0.954, 0.9415, 0.9285)),
    ("phased_dmd", "gmm10d"): Case(1300, (0.807, 0.8075, 0.825)),
    ("disback", "ring8"): Case(2300, (0.9195, 0.8915, 0.862)),            # 39-56 CPU s each
    ("disback", "gmm10d"): Case(2300, (0.853, 0.862, 0.866)),             # 61-83 CPU s each
    ("flash_dmd", "ring8"): Case(2300, (0.816, 0.757, 0.7875)),           # 95-103 CPU s each
    ("flash_dmd", "gmm10d"): Case(2300, (0.683, 0.641, 0.622)),           # 94 CPU s each
}
# Short at the test's 128 x 3 settings (docs/results/toy.md): on gmm10d the 4-step student of sid_4step (600 it:
# 5/5, 0.141) keeps every mode but is wide (most samples outside the modes' precision radius). At the recipe's own
# networks and budget (RECIPE_BUDGET, measured 2026-12-02 with this file's `distill`) it keeps every mode on every
# seed, still wide (within-mode std 1.48-1.51). With the teacher start of the others (1300 it, seed 0) it is still
# 1.36 x: its last step, re-noised by the input noise z again, widens step 2's 1.16 x. That case asserts coverage
# and a precision floor of half the lowest seed.
KNOWN_SHORT = {("sid_4step", "gmm10d")}
RECIPE_BUDGET: dict[tuple[str, str], Case] = {
    ("sid_4step", "gmm10d"): Case(600, (0.092, 0.072, 0.081), recipe_nets=True),        # 42-46 CPU s each
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
