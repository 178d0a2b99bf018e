"""SwiftBrush / SNOOPI PG-SB specifics (docs/objectives/swiftbrush.md): sign with a random w and with a
negative class, CFG on both networks with the same w, random w per step, negative class,
requirements. The shared contract is in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from helpers import repro
from scoredistill.config import ConfigError
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.process import EDM, VPDiscrete
from scoredistill.process.guidance import cfg_combine
from scoredistill.teachers.gmm import GMMTeacher, build_gmm


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cfg", [{"name": "swiftbrush", "guidance_scale_range": [1.0, 3.0]},
                                 {"name": "swiftbrush", "negative_class": 1}], ids=str)
@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_sign_moves_point_mass_toward_target(cfg, process):
    obj = build_objective(cfg)
    theta = torch.tensor([1.0, -0.5], requires_grad=True)
    teacher = GMMTeacher([[0.0, 0.0], [3.0, -1.5]], 0.05, classes=[0, 1], process=process)
    fake = GMMTeacher([[1.0, -0.5]], 0.05, process=process)
    out = obj.generator_loss(Batch(x=theta.expand(64, 2), cond=torch.zeros(64, dtype=torch.long), rng=_rng()),
                             Roles(teacher=teacher, fake=fake))
    (grad,) = torch.autograd.grad(out["loss"], theta)
    cos = float(grad @ theta.detach() / (grad.norm() * theta.detach().norm()))
    assert cos > 0.99, (grad, cos)


def _cond_roles(process=None):
    proc = process or EDM()
    teacher = build_gmm({"preset": "ring8_cond"}, proc)
    fake = MLPDenoiser(proc, 2, 32, 2, num_classes=4)
    torch.nn.init.normal_(fake.net.out.weight, std=0.1)
    return Roles(teacher=teacher, fake=fake)


def _replay(obj, x, cond, roles, seed, w, negative=None, draw_w=False):
    """The expected gradient a_t s_t (D^w_fake - D^w_real) / numel from the same random stream."""
    rng = _rng(seed)
    if draw_w:
        torch.rand((), generator=rng, dtype=torch.float64)
    proc = roles.process
    t = obj.time(x.shape[0], proc, generator=rng)
    noise = torch.randn(x.shape, generator=rng)
    x_t = proc.add_noise(x, noise, t)
    unc = torch.full_like(cond, -1 if negative is None else negative)
    d_real = cfg_combine(roles.teacher(x_t, t, unc), roles.teacher(x_t, t, cond), w)
    d_fake = cfg_combine(roles.fake(x_t, t, torch.full_like(cond, -1)), roles.fake(x_t, t, cond), w)
    a, s = proc.coeffs(t, x)
    return (a * s * (d_fake - d_real)).float() / x.numel()


def _grad(obj, x, cond, roles, seed):
    xx = x.clone().requires_grad_(True)
    out = obj.generator_loss(Batch(x=xx, cond=cond, rng=_rng(seed)), roles)
    return torch.autograd.grad(out["loss"], xx)[0], out


def test_cfg_on_teacher_and_fake_with_the_same_w():
    roles = _cond_roles()
    x, cond = torch.randn(32, 2), torch.randint(0, 4, (32,))
    obj = build_objective({"name": "swiftbrush", "guidance_scale": 3.0})
    g, out = _grad(obj, x, cond, roles, 4)
    assert out["w"] == 3.0
    assert torch.allclose(g, _replay(obj, x, cond, roles, 4, 3.0), atol=1e-7, rtol=1e-4)


def test_pg_sb_range_at_one_is_unguided():
    roles = _cond_roles()
    x, cond = torch.randn(32, 2), torch.randint(0, 4, (32,))
    g_rng, _ = _grad(build_objective({"name": "swiftbrush", "guidance_scale_range": [1.0, 1.0]}), x, cond, roles, 2)
    # the PG-SB draw consumes one number of the stream first; with lo = hi = 1 the field is unguided
    obj = build_objective({"name": "swiftbrush", "guidance_scale": 1.0})
    assert torch.allclose(g_rng, _replay(obj, x, cond, roles, 2, 1.0, draw_w=True), atol=1e-7, rtol=1e-4)


def test_pg_sb_draws_one_w_per_step_used_for_both():
    roles = _cond_roles()
    x, cond = torch.randn(32, 2), torch.randint(0, 4, (32,))
    obj = build_objective({"name": "swiftbrush", "guidance_scale_range": [2.0, 6.0]})
    ws = set()
    for seed in range(3):
        g, out = _grad(obj, x, cond, roles, seed)
        w = out["w"]
        assert 2.0 <= w <= 6.0
        ws.add(round(w, 6))
        assert torch.allclose(g, _replay(obj, x, cond, roles, seed, w, draw_w=True), atol=1e-7, rtol=1e-4)
    assert len(ws) == 3


def test_negative_class_replaces_teacher_uncond_branch():
    roles = _cond_roles()
    x, cond = torch.randn(32, 2), torch.randint(0, 4, (32,))
    obj = build_objective({"name": "swiftbrush", "guidance_scale": 2.5, "negative_class": 3})
    assert obj.requirements() == {"fake_score", "class_conditional"}
    g, _ = _grad(obj, x, cond, roles, 7)
    assert torch.allclose(g, _replay(obj, x, cond, roles, 7, 2.5, negative=3), atol=1e-7, rtol=1e-4)
    g_plain, _ = _grad(build_objective({"name": "swiftbrush", "guidance_scale": 2.5}), x, cond, roles, 7)
    assert not torch.allclose(g, g_plain, atol=1e-6)


def test_eps_fake_weighting_is_alpha_bar_weighted_eps_mse():
    proc = VPDiscrete()
    fake = MLPDenoiser(proc, 2, 16, 1)
    torch.nn.init.normal_(fake.net.out.weight, std=0.1)
    obj = build_objective({"name": "swiftbrush", "fake_weighting": "eps", "fake_cond_dropout": 0.0})
    x = torch.randn(16, 2)
    loss = obj.fake_loss(Batch(x=x, rng=_rng(5)), Roles(teacher=fake, fake=fake))
    rng = _rng(5)
    t = obj.fake_time(16, proc, generator=rng)
    eps = torch.randn(x.shape, generator=rng)
    x_t = proc.add_noise(x, eps, t)
    eps_hat = fake.eps(x_t, t)
    a, _ = proc.coeffs(t, x)
    expect = ((a * (eps_hat - eps)) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-3)


@pytest.mark.parametrize("cfg,field", [
    ({"name": "swiftbrush", "guidance_scale_range": [3.0, 1.0]}, "objective.guidance_scale_range"),
    ({"name": "swiftbrush", "guidance_scale_range": [1.0]}, "objective.guidance_scale_range"),
    ({"name": "swiftbrush", "negative_class": -2}, "objective.negative_class"),
    ({"name": "swiftbrush", "fake_weighting": "v"}, "objective.fake_weighting"),
    ({"name": "swiftbrush", "fake_guidance_scale": 2.0}, "objective.fake_guidance_scale"),  # same w by design
])
def test_bad_config(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_objective(cfg)
    assert e.value.field == field


def test_cond_plus_converts_the_range():
    obj = build_objective({"name": "swiftbrush", "guidance_scale": 3.5, "guidance_scale_range": [0.0, 2.0]},
                          guidance_convention="cond_plus")
    assert obj.p.guidance_scale == 4.5 and obj.p.guidance_scale_range == [1.0, 3.0]


def test_negative_class_needs_conditional_teacher_one_line(tmp_path, capsys):
    from scoredistill.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "recipes/toy/swiftbrush.yaml", "--out", str(tmp_path / "r"), "--set", "teacher.preset=ring8",
              "--set", "objective.negative_class=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class-conditional" in err[0], err
    assert not (tmp_path / "r" / "checkpoints").exists()


# -- distribution (slow) -----------------------------------------------------------------------------------
SWIFTBRUSH_SLOW = ["generator.width=128", "fake_score.width=128", "train.steps=2000", "eval.every=2000",
                   "train.progress=false", "eval.plots=false", "train.checkpoint_every=1000000"]


def swiftbrush_figures(d, res, n=500):
    """Every figure the distribution test asserts; ``own``: per class, the share of its precise samples on
    that class's own modes (ring8_cond)."""
    from scoredistill.metrics.gmm import assign

    own = {}
    for c in range(d.teacher.num_classes):
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + c))
        k, ok = assign(d.sample(z, torch.full((n,), c)), d.reference.means, d.reference.stds)
        own[c] = float((d.reference.classes[k[ok]] == c).double().mean()) if ok.any() else 0.0
    return {**{k: res[k] for k in ("precision", "modes_covered", "weight_tv", "sw2", "non_finite")}, "own": own}


@pytest.mark.slow
def test_swiftbrush_pg_sb_distills_ring8_cond(tmp_path):
    """The recipe (PG-SB w ~ U[1, 2], CFG on teacher and fake) on ring8_cond: all modes, mostly on each
    class's own two modes.

    Measured 2026-11-26 (width 128, 1500 iterations, seed 0): precision 0.701, 8/8 modes, weight TV 0.064,
    SW2 0.272; share of each class's precise samples on its own modes 0.98 / 0.87 / 0.95 / 0.80. Same config
    with a fixed w = 1 (no CFG): precision 0.700, TV 0.120, class consistency 0.68-0.99. Recipe width 256:
    precision 0.820, TV 0.043, every class 100 % on its own modes.
    The s_t^2 (x0: a_t s_t) weighting is dominated by large noise levels, so precision lags DMD2 here.

    Seed sweep 2026-12-01 (``swiftbrush_figures`` on this config, train.seed=S, 1 thread). At the former 1500
    iterations seed 3 had not converged: precision 0.539, 6/8 modes, weight TV 0.297, class 3 0 % on its own
    modes (seeds 0-2: precision 0.70-0.73, 8/8, TV 0.054-0.091, lowest own share 0.797-0.988), so the
    budget is now 2000: precision 0.755 / 0.853 / 0.745 / 0.802 (seeds 0-3), 8/8 modes each, weight TV
    0.070 / 0.038 / 0.101 / 0.075, SW2 0.215-0.254, lowest class share on its own modes 0.949 / 0.998 /
    0.894 / 0.972 (seed 3 at 2500: 0.893 / 8 / 0.035 / 1.0). TV is bounded at 0.15 (was 0.12, 0.02 above
    seed 2); a whole missing mode is caught by the mode count. Seed 0 on 2 threads: the same figures."""
    from scoredistill.config import load_yaml, resolve
    from scoredistill.engine.distiller import Distiller

    cfg = resolve(load_yaml("recipes/toy/swiftbrush.yaml"), SWIFTBRUSH_SLOW)
    d = Distiller(cfg, str(tmp_path))
    f = swiftbrush_figures(d, d.run())
    msg = repro(cfg, f)
    print("swiftbrush ring8_cond:", msg)
    assert f["non_finite"] == 0 and f["modes_covered"] == 8, msg
    assert f["precision"] > 0.6 and f["weight_tv"] < 0.15, msg
    assert all(v > 0.7 for v in f["own"].values()), msg
