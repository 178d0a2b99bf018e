"""Distribution tests: DMD2 and DMD distill exact-score GMM teachers into one-step generators.

Thresholds come from runs of the exact configs below over several training seeds and two thread counts
(seeded CPU training is bit-stable on one machine, not across instruction sets or thread counts, so the
seed spread stands in for the spread across machines). Measured 2026-11-26 / 2026-12-01:

- dmd2 ring8, 1000 it: precision 0.937 / 0.9445 / 0.906 / 0.9445 / 0.942 / 0.9345 (seeds 0, 1 (2 threads),
  1 (1 thread), 2, 3, 4); modes 8, 7, 7, 8, 8, 8. Seed 1 drops one mode whatever the thread count, and
  keeps it dropped at 1500 iterations (precision 0.793, 7/8): reverse KL has no pull back toward a mode
  the generator has left (docs/objectives/dmd2.md), so one missing mode is within what the method does.
- dmd2 gmm10d, 2000 it: precision 0.917 / 0.9215 / 0.92 (seeds 0-2), 5/5 modes each.
- dmd ring8, 500 it: 0.94 / 0.94 / 0.939, 8/8 each; dmd gmm10d, 800 it: 0.933 / 0.938 / 0.9355, 5/5 each
  (the regression term on teacher ODE pairs keeps every mode).

Asserted: precision >= 0.85 (lowest seen 0.906) and every mode covered, except one allowed missing for
DMD2 on ring8.

The gmm10d cases are marked ``long`` (run with ``SCOREDISTILL_LONG_TESTS=1``): they were the suite's slowest
(dmd2 176 s, dmd 42 s in a CI run on the shared box), and the dmd and dmd2 recipes' harder 16-D case (gmm16d,
8 modes) and asym with its light modes are asserted in the slow suite by tests/bench/test_toy_fidelity.py.
"""

import pytest

from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller

NETS = {"generator": {"kind": "mlp", "width": 256, "depth": 4}, "fake_score": {"kind": "mlp", "width": 256, "depth": 4}}
TRAIN = {"batch_size": 256, "lr": 1e-3, "fake_lr": 1e-3, "betas": [0.0, 0.99], "ema": 0.99, "progress": False,
         "checkpoint_every": 100000, "threads": 2}

# (objective, train settings, precision floor, modes allowed missing)
CASES = {
    ("dmd2", "ring8"): ({"name": "dmd2"}, {"steps": 1000, "generator_every": 5}, 0.85, 1),
    ("dmd2", "gmm10d"): ({"name": "dmd2"}, {"steps": 2000, "generator_every": 5}, 0.85, 0),
    ("dmd", "ring8"): ({"name": "dmd", "regression_weight": 0.25}, {"steps": 500, "generator_every": 1}, 0.85, 0),
    ("dmd", "gmm10d"): ({"name": "dmd", "regression_weight": 0.25}, {"steps": 800, "generator_every": 1}, 0.85, 0),
}


def _params():
    for method, preset in CASES:
        marks = [pytest.mark.long] if preset == "gmm10d" else []
        yield pytest.param(method, preset, marks=marks, id=f"{method}-{preset}")


@pytest.mark.slow
@pytest.mark.parametrize("method,preset", list(_params()))
def test_one_step_generator_covers_all_modes(tmp_path, method, preset):
    obj, train, min_precision, may_miss = CASES[(method, preset)]
    cfg = resolve({"teacher": {"kind": "gmm", "preset": preset}, **NETS, "objective": obj,
                   "train": {**TRAIN, **train}, "eval": {"every": 100000, "n_samples": 2000, "plots": False}})
    res = Distiller(cfg, str(tmp_path / "run")).run()
    seen = {k: res[k] for k in ("precision", "modes_covered", "num_modes", "weight_tv", "sw2")}
    msg = f"{method} on {preset}, train.seed={cfg['train']['seed']}, {cfg['train']['threads']} threads: {seen}"
    print(msg)
    assert res["modes_covered"] >= res["num_modes"] - may_miss, msg
    assert res["precision"] >= min_precision, msg
    assert res["non_finite"] == 0, msg
