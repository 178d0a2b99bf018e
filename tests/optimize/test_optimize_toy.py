"""Distribution tests of optimization under a prior on exact-score GMM teachers (docs/optimize/README.md).

Thresholds come from runs of each test's own ``measure_*`` function over train.seed 0-3 (1 thread, as the
tests pin: ``measure_NAME(seed=S, threads=1)``), measured 2026-12-01; each test's docstring gives the
spread. Exact-sample floors on ring8 with 256 samples (20 seeds): SW2 0.12–0.24 (mean 0.17), spread ratio
0.98–1.00, cluster spread 0.95–1.08; so an SW2 bound below ~0.3 would fail a perfect sampler on some seeds.
A failing assert prints the seed, the thread count and every figure.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import repro
from scoredistill.optimize.config import resolve
from scoredistill.optimize.driver import PriorOptimizer


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs here set ``train.threads: 1``; give the rest of the session its thread count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


RING8 = {"kind": "gmm", "preset": "ring8", "process": {"kind": "vp"}}
RING8_COND = {"kind": "gmm", "preset": "ring8_cond", "process": {"kind": "vp"}}


def optimize(teacher, params, objective, steps, lr=(0.02, 0.002), fake=None, **train):
    cfg = {"teacher": teacher, "params": {"kind": "particles", "n": 256, **params}, "objective": objective,
           "train": {"steps": steps, "lr": [0, lr[0], lr[1], steps], "progress": False, "fake_lr": 1e-3,
                     "threads": 1, **train},
           "eval": {"every": steps, "plots": False}}
    if fake:
        cfg["fake_score"] = fake
    opt = PriorOptimizer(resolve(cfg), None)
    return opt, opt.run()


SMALL_FAKE = {"width": 64, "depth": 2}
FIELD_KEYS = ("precision", "modes_covered", "sw2", "spread_ratio", "cluster_spread_ratio", "mode_spread_ratio",
              "radius_mean", "weight_tv", "class_accuracy")


def figures(res):
    """The run's figures that the tests here assert on (also what the seed sweep records)."""
    return {k: res[k] for k in FIELD_KEYS if k in res}


def measure_sds_collapse(steps=1000, **train):
    _, sds = optimize(RING8, {}, {"name": "sds", "weighting": "sds"}, steps, **train)
    opt, uni = optimize(RING8, {}, {"name": "sds", "weighting": "uniform"}, steps, **train)
    return opt, {"sds": figures(sds), "uniform": figures(uni)}


def test_sds_particles_collapse():
    """SDS weighting collapses the particles (large t pulls to the global mean); uniform weighting finds every
    mode, each as a shrunken clump pulled toward the centre.

    Seeds 0-3 (1000 steps): SDS spread 0.153-0.157, radius 0.286-0.291, precision 0.0; uniform precision
    0.926-0.977, spread 0.684-0.696, cluster spread 0.449-0.547, distance to the means 2.17-2.23x the mode
    std."""
    opt, f = measure_sds_collapse()
    msg = repro(opt.cfg, f)
    sds, uni = f["sds"], f["uniform"]
    assert sds["spread_ratio"] < 0.35 and sds["radius_mean"] < 0.7 and sds["precision"] < 0.1, msg
    assert uni["precision"] > 0.8 and uni["spread_ratio"] < 0.8 and uni["cluster_spread_ratio"] < 0.65, msg
    assert uni["mode_spread_ratio"] > 1.5, msg


def measure_vsd_match(steps=600, **train):
    opt, res = optimize(RING8, {}, {"name": "vsd_particles"}, steps, fake=SMALL_FAKE, **train)
    return opt, {**figures(res), "params_skipped": res["nonfinite_skipped"]["params"]}


def test_vsd_particles_match_the_teacher():
    """VSD particles match the teacher.

    Seeds 0-3 (600 steps): 8/8 modes, precision 0.984-0.992, SW2 0.124-0.204 (exact-sample floor up to
    0.24, so the bound is 0.3, was 0.25), spread 0.993-1.008, cluster spread 1.052-1.117, weight TV
    0.035-0.061."""
    opt, f = measure_vsd_match()
    msg = repro(opt.cfg, f)
    assert f["modes_covered"] == 8 and f["precision"] > 0.95, msg
    assert f["sw2"] < 0.3 and 0.93 < f["spread_ratio"] < 1.07, msg
    assert 0.75 < f["cluster_spread_ratio"] < 1.4, msg
    assert f["weight_tv"] < 0.15 and f["params_skipped"] == 0, msg


def measure_vsd_esd(steps=600, **train):
    _, vsd = optimize(RING8, {"views": "index"}, {"name": "vsd_particles"}, steps, fake=SMALL_FAKE, **train)
    opt, esd = optimize(RING8, {"views": "index"}, {"name": "esd", "view_lambda": 1.0}, steps, fake=SMALL_FAKE,
                        **train)
    return opt, {"vsd": figures(vsd), "esd": figures(esd)}


@pytest.mark.slow
def test_particle_conditioned_vsd_collapses_and_esd_restores_spread():
    """The camera analogue: view = particle index, so the fake becomes a Dirac per view (ESD argument).

    Seeds 0-3 (600 steps): VSD spread 0.250-0.265, 0/8 modes, SW2 1.06-1.09; ESD lambda=1 spread 1.017-1.045,
    8/8 modes, precision 0.98-0.99, SW2 0.141-0.258. The ESD SW2 bound is 0.35: exact samples reach 0.24 and
    seed 2 reached 0.258, so the former 0.3 left 0.04 of margin; collapse (VSD here) is above 1.0."""
    opt, f = measure_vsd_esd()
    msg = repro(opt.cfg, f)
    vsd, esd = f["vsd"], f["esd"]
    assert vsd["spread_ratio"] < 0.4 and vsd["modes_covered"] <= 2, msg
    assert esd["spread_ratio"] > 0.9 and esd["modes_covered"] == 8 and esd["sw2"] < 0.35, msg
    assert esd["spread_ratio"] - vsd["spread_ratio"] > 0.5, msg


def measure_csd(**train):
    """Class accuracy before, after 300 steps and after 1000 steps, and the radius at 300 and 1000."""
    opt, res0 = optimize(RING8_COND, {"classes": "uniform", "init_std": 0.5}, {"name": "csd"}, 1, lr=(0.02, 0.02),
                         **train)
    opt.cfg["eval"]["every"] = 10**6      # evaluate only at the end of each run() call
    f = {"acc0": res0["class_accuracy"]}
    for steps in (300, 1000):
        opt.cfg["train"]["steps"] = steps
        res = opt.run()
        f.update({f"acc{steps}": res["class_accuracy"], f"r{steps}": res["radius_mean"]})
    return opt, f


def test_csd_moves_along_the_classifier_direction():
    """CSD: class accuracy rises to ~1 within 300 steps, then the particles drift without bound.

    Seeds 0-3: class accuracy 0.20-0.29 at the start, 0.984-1.0 after 300 steps, 1.0 after 1000; radius
    2.19-2.25 at 300, 9.27-9.34 at 1000."""
    opt, f = measure_csd()
    msg = repro(opt.cfg, f)
    assert f["acc0"] < 0.5 and f["acc300"] > 0.95, msg
    assert f["acc1000"] > 0.95 and f["r1000"] > 2 * f["r300"] and f["r1000"] > 4.0, msg


MODE_SEEKING = {
    "asd": (RING8, {}),
    "ism": (RING8, {"warmup_iter": 150}),
    "tsm": (RING8, {"warmup_iter": 150}),
    "cds": (RING8, {"t_next": {"kind": "sqrt", "start_step": 0, "start": 0.7, "end": 0.1, "end_step": 300},
                    "grad_clamp": [0, 2.0, 8.0, 300]}),
    "bsd": (RING8_COND, {}),
}


def measure_mode_seeking(name, steps=300, **train):
    teacher, extra = MODE_SEEKING[name]
    params = {"classes": "uniform"} if teacher is RING8_COND else {}
    opt, res = optimize(teacher, params, {"name": name, **extra}, steps, **train)
    x, _ = opt.render_all()
    return opt, {**figures(res), "non_finite": res["non_finite"], "params_skipped": res["nonfinite_skipped"]["params"],
                 "x_finite": bool(torch.isfinite(x).all()), "x_absmax": float(x.abs().max()),
                 "field_norm": res["train"]["field_norm"]}


@pytest.mark.parametrize("name", list(MODE_SEEKING))
def test_mode_seeking_objectives_run_without_nan(name):
    """300 steps stay finite and bounded (no distribution claim: each method's own page has its figures).

    Seeds 0-3: no non-finite step or skipped update; largest |x| 0.3-1.9 (asd, ism, tsm, bsd), 5.0-5.5
    (cds); mean field norm 0.013-0.026 (asd, tsm), 0.46-0.65 (ism, cds, bsd)."""
    opt, f = measure_mode_seeking(name)
    msg = repro(opt.cfg, f)
    assert f["non_finite"] == 0 and f["params_skipped"] == 0, msg
    assert f["x_finite"] and f["x_absmax"] < 50, msg
    for k in ("precision", "sw2", "spread_ratio", "cluster_spread_ratio"):
        assert math.isfinite(f[k]), msg
    assert f["field_norm"] > 0, msg


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_image_sds_ends_in_the_class_modes(k):
    # one image, 8 noise draws per step, canonical CFG 7.5 on ring8_cond (class k owns modes k, k+4)
    cfg = {"teacher": RING8_COND,
           "params": {"kind": "image", "n": 1, "repeat": 8, "classes": k, "init_std": 0.5},
           "objective": {"name": "sds", "guidance_scale": 7.5, "weighting": "sds"},
           "train": {"steps": 500, "lr": [0, 0.05, 0.005, 500], "seed": k, "progress": False, "threads": 1},
           "eval": {"every": 500, "plots": False}}
    opt = PriorOptimizer(resolve(cfg), None)
    res = opt.run()
    x, _ = opt.render_all()
    mu = opt.reference.means.float()
    nearest = int(((x - mu) ** 2).sum(1).argmin())
    assert nearest in (k, k + 4) and res["class_accuracy"] == 1.0
    # over-saturated along the class axis by CFG (measured radius 2.8-3.3 for the ring's 2.0)
    assert float(x.norm()) > 2.0
