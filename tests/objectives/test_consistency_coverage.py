"""4-step coverage of the consistency family on ``ring8`` (8 equal modes, 2-D) and ``gmm10d`` (5 equal modes,
10-D): each recipe of ``recipes/toy`` as committed, only the teacher preset and the seed changed, is trained for
its own 3000 iterations and its EMA student sampled with 4 steps, exactly one row of

    scoredistill bench --suite toy --methods M --teachers T --steps 3000 --steps-eval 1,2,4 --seeds S \\
        --n-eval 2000 --set train.threads=1

(``meanflow`` adds ``--set generator.steps=4``: its recipe samples in 2 steps, and the step count only sets the
sampler, not its training). The measured rows are in docs/results/toy.md ("4-step coverage on ring8 and gmm10d":
seeds 0 / 1 / 2 for ``cd``, ``ict``, ``tcm``, ``tbcm``, ``hypersd`` on gmm10d, 0 / 1 for ``scm``, 0 for the rest);
each floor below is the lowest precision seen there less the margin. Seeded CPU
training is bit-stable on one machine; the seed spread stands in for the spread across machines.

A recipe-budget run costs 100-150 s of CPU (30-50 ms per iteration on one thread of the loaded 2-core box), so
these cases are opt-in (``SCOREDISTILL_LONG_TESTS=1``); CI runs ``cd`` at 800 iterations on gmm10d
(:func:`test_cd_800_iterations_covers_every_mode`, ``slow``; its ring8 twin is opt-in).
"""

from pathlib import Path

import pytest

from scoredistill.bench.toy import run_one

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "toy"
LONG = pytest.mark.long  # a recipe-budget training (100-150 s CPU each)

MARGIN = 0.07  # the margin of the other few-step coverage tests (tests/objectives/test_fewstep_distribution.py)
# (method, preset) -> lowest 4-step precision over the seeds measured in docs/results/toy.md (3000 iterations; one
# seed where only seed 0 was measured, so those floors carry no seed spread beyond the margin)
LOWEST = {
    ("cd", "gmm10d"): 0.702,  # seeds 0/1/2: 0.7115 / 0.7275 / 0.702
    ("cd", "ring8"): 0.9,  # seeds 0: 0.9
    ("ect", "gmm10d"): 0.824,  # seeds 0: 0.824
    ("hypersd", "gmm10d"): 0.8645,  # seeds 0/1/2: 0.8645 / 0.8985 / 0.911
    ("ict", "gmm10d"): 0.845,  # seeds 0/1/2: 0.855 / 0.881 / 0.845
    ("ict", "ring8"): 0.9665,  # seeds 0: 0.9665
    ("meanflow", "gmm10d"): 0.93,  # seeds 0: 0.93
    ("meanflow", "ring8"): 0.9095,  # seeds 0: 0.9095
    ("rcm", "gmm10d"): 0.9115,  # seeds 0: 0.9115
    ("rcm", "ring8"): 0.9045,  # seeds 0: 0.9045
    ("scm", "gmm10d"): 0.5715,  # seeds 0/1: 0.5715 / 0.8255
    ("tbcm", "gmm10d"): 0.577,  # seeds 0/1/2: 0.6255 / 0.614 / 0.577
    ("tcm", "gmm10d"): 0.85,  # seeds 0/1/2: 0.85 / 0.9325 / 0.8925
    ("twinflow", "gmm10d"): 0.9505,  # seeds 0: 0.9505
}
# cd at 800 iterations (CI): 4-step precision over train.seed 0 / 1 / 2, every mode covered in each
CD_800 = {"gmm10d": (0.330, 0.3845, 0.4185), "ring8": (0.656, 0.6665, 0.722)}


def _four_step_row(tmp_path, method: str, preset: str, seed: int = 0, steps: int = 3000) -> dict:
    extra = ["generator.steps=4"] if method == "meanflow" else []
    row = run_one(method, RECIPES / f"{method}.yaml", preset, seed, str(tmp_path / "run"), None, steps=steps,
                  n_eval=2000, overrides=["train.threads=1", *extra], steps_eval=[4])
    assert row["status"] == "ok", row["status"]
    return row["by_steps"]["4"]


def _check(m: dict, floor: float, what: str) -> None:
    msg = f"{what}: {m}"
    print(msg)
    assert m["non_finite"] == 0, msg
    assert m["modes_covered"] == m["num_modes"], msg
    assert m["precision"] >= floor, msg


@pytest.mark.slow
@pytest.mark.parametrize("preset", [pytest.param("gmm10d"), pytest.param("ring8", marks=LONG)])
def test_cd_800_iterations_covers_every_mode(tmp_path, preset):
    """``recipes/toy/cd.yaml`` at 800 of its 3000 iterations, seed 0 (gmm10d in CI, ~35 s CPU on the loaded box;
    ring8 opt-in): every mode at 4 steps and precision above the lowest of the three measured seeds less the
    margin. The student is still blurred here (within-mode std 1.41-1.43 x the target's on gmm10d, 1.77-1.80 x
    on ring8), hence the low floors; a run that loses a mode or diverges still fails."""
    _check(_four_step_row(tmp_path, "cd", preset, steps=800), min(CD_800[preset]) - MARGIN, f"cd 800 it on {preset}")


@pytest.mark.slow
@LONG
@pytest.mark.parametrize(("method", "preset"), sorted(LOWEST))
def test_recipe_covers_every_mode_at_4_steps(tmp_path, method, preset):
    _check(_four_step_row(tmp_path, method, preset), LOWEST[method, preset] - MARGIN,
           f"{method} 3000 it on {preset}, seed 0")
