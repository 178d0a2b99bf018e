"""benchmarks/toy_time_to_quality.py: its quality bar separates exact samples from too-sharp and mode-dropping
ones, and its hand-written DMD2 loop runs on the exact teacher."""

import importlib.util
import os

import pytest
import torch

from scoredistill.metrics.gmm import gmm_metrics
from scoredistill.process import EDM
from scoredistill.teachers.gmm import build_gmm

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "toy_time_to_quality.py")


def bench():
    spec = importlib.util.spec_from_file_location("toy_time_to_quality", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_bar_on_exact_sharp_and_mode_dropping_samples():
    b = bench()
    gmm = build_gmm({"kind": "gmm", "preset": "asym6"}, EDM())
    x = gmm.sample(1000, generator=torch.Generator().manual_seed(3)).double()
    k = torch.cdist(x, gmm.means).argmin(1)
    assert b.quality(gmm_metrics(x, gmm), gmm.weights) == (True, 6, 6)
    sharp = gmm.means[k] + 0.6 * (x - gmm.means[k])  # every mode at 0.6 of its std
    assert b.quality(gmm_metrics(sharp, gmm), gmm.weights) == (False, 6, 6)
    wide = gmm.means[k] + 1.3 * (x - gmm.means[k])
    assert not b.quality(gmm_metrics(wide, gmm), gmm.weights)[0]
    dropped = x[k != 5]  # the 5 % mode gone
    assert b.quality(gmm_metrics(dropped, gmm), gmm.weights) == (False, 5, 6)


@pytest.mark.parametrize("regression", [(0.0, 0), (1.0, 3)], ids=["dmd2", "regression-warm-up"])
def test_plain_loop_steps_and_samples(regression):
    b = bench()
    gmm = build_gmm({"kind": "gmm", "preset": "asym6"}, EDM())
    tc = {"lr": 1e-3, "fake_lr": None, "betas": [0.0, 0.99], "fake_betas": None, "batch_size": 32,
          "generator_every": 5, "grad_clip": 10.0, "ema": 0.99, "ode_pairs": 16, "ode_steps": 4, "seed": 0}
    step, sample = b.plain_loop(gmm, tc, width=32, depth=2, seed=0, regression=regression)
    z = torch.randn(64, 2)
    before = sample(z).clone()
    for _ in range(6):  # generator updated at iterations 0 and 5
        step()
    after = sample(z)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_plain_loop_draws_the_recipes_field_times():
    b = bench()
    assert b.field_time({"time": {"kind": "uniform", "t_min": 0.2, "t_max": 0.98}}) == (0.2, 0.98)
    assert b.field_time({}) == (0.02, 0.98)
    with pytest.raises(SystemExit, match="uniform"):
        b.field_time({"time": {"kind": "lognormal", "p_mean": -1.2, "p_std": 1.2}})
