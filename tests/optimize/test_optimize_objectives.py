"""Unit tests of the SDS-family objectives (optimization under a prior; docs/optimize/): fixed points on
a point mass, the DDIM-inversion helper, CSD's classifier direction and batch
normalisation, BSD's min-norm weight, CDS's fixed-noise state, ESD's view mixing, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from scoredistill.config import ConfigError
from scoredistill.objectives.base import Batch, Roles, build_objective
from scoredistill.objectives.bsd import min_norm_alpha
from scoredistill.objectives.core import eps_of
from scoredistill.objectives.ism import ddim_invert, ddim_step
from scoredistill.optimize.fake import ViewConditionedDenoiser
from scoredistill.optimize.schedule import Schedule, extract_schedules, parse_schedule
from scoredistill.process.processes import VPDiscrete
from scoredistill.teachers.gmm import GMMTeacher, build_gmm

VP = VPDiscrete()


def ring8_cond():
    return build_gmm({"preset": "ring8_cond"}, VP)


def point_mass(at=(0.0, 0.0)):
    return GMMTeacher([list(at)], 1e-6, process=VP)


def field(name, x, teacher, cond=None, fake=None, view=None, seed=0, step=0, index=None, num_items=None,
          **params):
    """The injected field ``g`` (= dL/dx with the sum/B reduction) of objective ``name``."""
    obj = build_objective({"name": name, **params})
    return field_of(obj, x, teacher, cond, fake, view, seed, step, index, num_items)


def field_of(obj, x, teacher, cond=None, fake=None, view=None, seed=0, step=0, index=None, num_items=None):
    x = x.clone().requires_grad_(True)
    rng = torch.Generator().manual_seed(seed)
    b = Batch(x=x, cond=cond, view=view, index=index, num_items=num_items, rng=rng, step=step)
    out = obj.generator_loss(b, Roles(teacher=teacher, fake=fake))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    return x.grad.detach().double() * x.shape[0]   # inject(..., "sum_per_sample") gives dL/dx_i = g_i / B


# -- fixed points on a point mass (signs: test_contract.py) ------------------------------------------------------
@pytest.mark.parametrize("name", ["ism", "tsm"])
def test_ism_tsm_vanish_for_a_point_mass(name):
    # DDIM inversion is the exact PF-ODE map of a point mass, so the interval targets are consistent
    # (float64 data: the inversion starts at t = 0 where eps_hat ~ |x| / rho_min ~ 300)
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    assert field(name, x, point_mass(), guidance_scale=1.0).abs().max() < 1e-6
    assert field(name, x, GMMTeacher([[0.0, 0.0]], 0.5, process=VP), guidance_scale=1.0).abs().max() > 1e-4


def test_vsd_particles_fixed_point_is_q_equals_p():
    # with the fake equal to the teacher the field vanishes (q = p is the fixed point)
    g0 = field("vsd_particles", torch.zeros(16, 2), point_mass(), fake=point_mass(), guidance_scale=1.0)
    assert g0.abs().max() < 1e-9


def test_cds_field_vanishes_for_a_point_mass_and_not_otherwise():
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    g = field("cds", x, point_mass(), guidance_scale=1.0, t_next=0.3)
    assert g.abs().max() < 1e-6          # one Euler step of the point-mass PF-ODE is exact (docs/optimize/cds.md)
    g2 = field("cds", x, ring8_cond(), guidance_scale=1.0, t_next=0.3)
    assert g2.abs().max() > 1e-3


def test_cond_plus_convention_converted_at_load():
    obj = build_objective({"name": "sds", "guidance_scale": 0.0}, "cond_plus")
    assert obj.p.guidance_scale == 1.0
    obj = build_objective({"name": "cds", "guidance_scale": 100}, "cond_plus")
    assert obj.p.guidance_scale == 101.0


def test_fake_cfg_one_is_the_conditional_fake():
    teacher = ring8_cond()
    fake = ViewConditionedDenoiser(VP, (2,), 4, None, width=32, depth=1)
    with torch.no_grad():
        for p in fake.parameters():
            p.normal_(0, 0.3)
    x, cond = torch.randn(32, 2), torch.arange(32) % 4
    a = field("vsd_particles", x, teacher, cond=cond, fake=fake, fake_guidance_scale=1.0)
    b = field("vsd_particles", x, teacher, cond=cond, fake=fake, fake_guidance_scale=2.0)
    assert (a - b).abs().max() > 1e-4


# -- ESD view mixing -------------------------------------------------------------------------------------
def test_esd_lambda_interpolates_between_view_and_marginal_fake():
    teacher = ring8_cond()
    fake = ViewConditionedDenoiser(VP, (2,), None, 16, width=32, depth=1)
    with torch.no_grad():
        for p in fake.parameters():
            p.normal_(0, 0.3)
    x, view = torch.randn(32, 2), torch.arange(32) % 16
    g = {lam: field("esd", x, teacher, fake=fake, view=view, view_lambda=lam) for lam in (0.0, 0.25, 1.0)}
    assert (g[0.0] - g[1.0]).abs().max() > 1e-4
    assert torch.allclose(g[0.25], 0.75 * g[0.0] + 0.25 * g[1.0], atol=1e-6)
    g_vsd = field("vsd_particles", x, teacher, fake=fake, view=view)
    assert torch.allclose(g_vsd, g[0.0], atol=1e-10)


def test_view_conditioned_fake_labels_are_distinct():
    f = ViewConditionedDenoiser(VP, (2,), 3, 5, width=8, depth=1)
    c = torch.tensor([[a, b] for a in range(-1, 3) for b in range(-1, 5)])
    j = f.joint_label(c)
    assert len(set(j.tolist())) == len(c) == f.net.num_classes + 1
    assert int(j[0]) == -1                      # (null, null) is the MLP's null class
    assert torch.equal(f.joint_label(torch.tensor([2, -1])), f.joint_label(torch.tensor([[2, -1], [-1, -1]])))


# -- DDIM inversion helper --------------------------------------------------------------------------------
def test_ddim_inversion_is_exact_for_a_point_mass():
    teacher = point_mass((0.5, -0.5))
    torch.manual_seed(0)
    x = VP.add_noise(torch.tensor([[0.5, -0.5]]).expand(8, 2), torch.randn(8, 2), torch.full((8,), 0.1))
    t0, t1 = torch.full((8,), 0.1, dtype=torch.float64), torch.full((8,), 0.7, dtype=torch.float64)
    one, _, _ = ddim_invert(teacher, x, t0, t1, stride=1.0, max_steps=1)
    many, reached, preds = ddim_invert(teacher, x, t0, t1, stride=0.05, max_steps=100)
    assert torch.allclose(reached, t1) and len(preds) == 12
    assert torch.allclose(one, many, atol=1e-5)


def test_ddim_inversion_round_trip_converges_on_a_mixture():
    teacher = ring8_cond()
    x0 = teacher.sample(16, generator=torch.Generator().manual_seed(0)).double()
    t0 = torch.full((16,), 0.05, dtype=torch.float64)
    t1 = torch.full((16,), 0.4, dtype=torch.float64)
    x = VP.add_noise(x0, torch.randn(16, 2, generator=torch.Generator().manual_seed(1)).double(), t0)
    errors = []
    for h in (0.02, 0.01, 0.005):
        up, _, _ = ddim_invert(teacher, x, t0, t1, stride=h, max_steps=1000)
        back, cur = up, t1
        while float(cur[0]) > 0.05 + 1e-9:      # DDIM back down with the same steps
            nxt = (cur - h).clamp(min=0.05)
            back = ddim_step(VP, back, eps_of(teacher, back, cur, None), cur, nxt)
            cur = nxt
        assert (up - x).abs().max() > 0.5
        errors.append(float((back - x).abs().max()))
    # first-order (Euler) convergence of invert-then-denoise to the identity (measured 0.145, 0.083, 0.041)
    assert errors[1] < 0.65 * errors[0] and errors[2] < 0.65 * errors[1] and errors[2] < 0.06, errors


# -- CSD -----------------------------------------------------------------------------------------------
def test_csd_descends_along_the_classifier_score():
    teacher = ring8_cond()
    torch.manual_seed(0)
    x = torch.randn(512, 2) * 1.5
    cond = torch.arange(512) % 4
    g = torch.zeros(512, 2, dtype=torch.float64)
    for s in range(8):
        g += field("csd", x, teacher, cond=cond, seed=s, grad_normalize=False,
                   time={"kind": "uniform", "t_min": 0.02, "t_max": 0.2})
    xr = x.double().clone().requires_grad_(True)
    logit = teacher.log_prob(xr, torch.zeros(512), cond) - teacher.log_prob(xr, torch.zeros(512))
    (grad_cls,) = torch.autograd.grad(logit.sum(), xr)       # grad log p(c|x) at t = 0
    cos = torch.nn.functional.cosine_similarity(-g, grad_cls, dim=1)
    assert cos.median() > 0.8, cos.median()


def test_csd_normalises_the_whole_batch():
    teacher = ring8_cond()
    x, cond = torch.randn(64, 2), torch.arange(64) % 4
    g = field("csd", x, teacher, cond=cond)
    assert math.isclose(float(g.norm()), 1.0, rel_tol=1e-5)
    assert g.norm(dim=1).std() > 0           # not per-sample normalised
    with pytest.raises(ConfigError):
        field("csd", x, teacher, cond=None)
    with pytest.raises(ConfigError):
        field("csd", x, teacher, cond=cond, lambda_neg=-1.0)
    gn = field("csd", x, teacher, cond=cond, lambda_neg=-1.0, lambda_null=0.0, negative_class=2)
    assert torch.isfinite(gn).all() and (gn - g).abs().max() > 1e-4


# -- BSD -----------------------------------------------------------------------------------------------
def test_bsd_min_norm_weight_matches_brute_force():
    torch.manual_seed(0)
    gc, gd = torch.randn(32, 3).double(), torch.randn(32, 3).double()
    alpha = min_norm_alpha(gc, gd)
    best = (alpha * gc + (1 - alpha) * gd).norm(dim=1)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    norms = (grid[None, :, None] * gc[:, None] + (1 - grid[None, :, None]) * gd[:, None]).norm(dim=-1)
    assert (best <= norms.min(1).values + 1e-12).all()
    assert ((alpha > 0) & (alpha < 1)).any() and ((alpha == 0) | (alpha == 1)).any()


def test_bsd_field_is_finite_and_needs_a_class():
    teacher = ring8_cond()
    x, cond = torch.randn(32, 2), torch.arange(32) % 4
    assert torch.isfinite(field("bsd", x, teacher, cond=cond)).all()
    with pytest.raises(ConfigError):
        field("bsd", x, teacher)


# -- CDS fixed noise state --------------------------------------------------------------------------------
def test_cds_noise_is_fixed_per_item_and_restorable():
    teacher = ring8_cond()
    obj = build_objective({"name": "cds", "guidance_scale": 1.0, "perturb": 0.0})
    x = torch.randn(10, 2)
    idx = torch.tensor([3, 7])
    g1 = field_of(obj, x[idx], teacher, index=idx, num_items=10)
    state = obj.state_tensors()
    assert state["fixed_noise"].shape == (10, 2)
    g2 = field_of(obj, x[idx], teacher, index=idx, num_items=10, seed=5)
    assert torch.allclose(g1, g2)             # same noise (perturb 0 => same t): same field
    other = build_objective({"name": "cds", "guidance_scale": 1.0, "perturb": 0.0, "noise_seed": 9})
    g3 = field_of(other, x[idx], teacher, index=idx, num_items=10)
    assert (g3 - g1).abs().max() > 1e-6
    other.load_state_tensors(state)
    assert torch.allclose(field_of(other, x[idx], teacher, index=idx, num_items=10), g1)


def test_grad_clamp_bounds_the_field():
    teacher = ring8_cond()
    x = torch.randn(64, 2) * 3
    g = field("sds", x, teacher, weighting="uniform", grad_clamp=0.05)
    assert g.abs().max() <= 0.05 + 1e-6
    assert g.abs().max() > 0.049


def test_bad_objective_params_are_one_line_errors():
    for cfg, fld in [({"name": "sds", "weighting": "x"}, "objective.weighting"),
                     ({"name": "ism", "xs_inv_steps": 0}, "objective.xs_inv_steps"),
                     ({"name": "esd", "view_lambda": 2.0}, "objective.view_lambda"),
                     ({"name": "cds", "t_clamp_min": 0.9, "t_clamp_max": 0.5}, "objective.t_clamp_max"),
                     ({"name": "csd", "negative_class": -2}, "objective.negative_class")]:
        with pytest.raises(ConfigError) as e:
            build_objective(cfg)
        assert e.value.field == fld


# -- schedules ---------------------------------------------------------------------------------------
def test_schedules():
    lin = parse_schedule([100, 2.0, 8.0, 1100], "x")
    assert (lin(0), lin(100), lin(600), lin(1100), lin(5000)) == (2.0, 2.0, 5.0, 8.0, 8.0)
    sq = parse_schedule({"kind": "sqrt", "start_step": 0, "start": 0.7, "end": 0.1, "end_step": 100}, "x")
    assert math.isclose(sq(25), 0.7 - 0.6 * 0.5)
    st = parse_schedule({"kind": "step", "start_step": 0, "start": 0.98, "end": 0.5, "end_step": 5000}, "x")
    assert (st(4999), st(5000)) == (0.98, 0.5)
    assert parse_schedule(0.5, "x") is None
    assert Schedule(0, 1.0, 2.0, 10).map(lambda v: v + 1)(10) == 3.0
    for bad in ([1, 2, 3], [0, 1, 2, "a"], [10, 1, 2, 5], {"kind": "cubic", "start_step": 0, "start": 1,
                                                            "end": 2, "end_step": 3}):
        with pytest.raises(ConfigError):
            parse_schedule(bad, "objective.grad_clamp")
    clean, found = extract_schedules({"name": "sds", "grad_clamp": [0, 2, 8, 10],
                                      "time": {"kind": "uniform", "t_max": [0, 0.98, 0.5, 10]}}, "objective")
    assert clean == {"name": "sds", "grad_clamp": 2.0, "time": {"kind": "uniform", "t_max": 0.98}}
    assert set(found) == {"grad_clamp", "time.t_max"}
