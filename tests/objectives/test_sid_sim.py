"""SiD / SiDA / SIM specifics (docs/objectives/sid.md, docs/objectives/sim.md): signs of the variants,
divergence gradients, where the stop-gradients sit, the guided teacher. The shared contract is in
test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

from scoredistill.config import ConfigError
from scoredistill.models.generators import DiscriminatorHead
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import sim as sim_module
from scoredistill.objectives.base import Batch, Roles, build_objective
from scoredistill.objectives.core import dm_normaliser
from scoredistill.process.guidance import cfg_combine
from scoredistill.teachers.gmm import PRESETS, GMMTeacher


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


# -- sign on a point mass, variants beyond the contract's defaults ---------------------------------------
@pytest.mark.parametrize("cfg", [
    {"name": "sid", "alpha": 1.0},
    {"name": "sid", "weighting": "none"},
    {"name": "sim", "pathwise": True},
    {"name": "sim", "weighting": "fisher"},
])
def test_point_mass_sign(cfg):
    """Target ~ delta_0, generator = delta_theta with theta = 2 and its exact fake score: one SGD step
    on the loss moves theta toward 0 (a flipped sign moves it away)."""
    teacher = GMMTeacher([[0.0]], 0.05)
    theta = torch.nn.Parameter(torch.tensor(2.0))
    fake = GMMTeacher([[theta.item()]], 0.05)
    obj = build_objective(cfg)
    x = theta.expand(256, 1)
    out = obj.generator_loss(Batch(x=x, rng=_rng(1)), Roles(teacher=teacher, fake=fake))
    opt = torch.optim.SGD([theta], lr=0.1)
    opt.zero_grad()
    out["loss"].backward()
    assert theta.grad > 0, f"{cfg}: gradient {theta.grad} points away from the target"
    opt.step()
    assert 0 <= theta.item() < 2.0


# -- surrogate gradients vs finite differences of the divergence -----------------------------------
N_QUAD = 60
C_HUBER = 0.3
TEACHER_1D = GMMTeacher([[0.0]], 1.0)


def _quadrature():
    nodes, wts = hermegauss(N_QUAD)
    wts = wts / np.sqrt(2 * np.pi)
    z, n = np.meshgrid(nodes, nodes, indexing="ij")
    w = torch.tensor(np.outer(wts, wts).reshape(-1))
    return torch.tensor(z.reshape(-1, 1)), torch.tensor(n.reshape(-1, 1)), w


def _fake(m: float, b: float) -> GMMTeacher:
    """Exact denoiser of the generator x = m + b z (a frozen network: built from plain floats)."""
    return GMMTeacher(torch.tensor([[float(m)]], dtype=torch.float64), float(b))


def _divergence(m, b, sigma, kind, pi=None):
    """E_{x_t ~ q_pi,t}[d(s_p(x_t) - s_{q_(m,b)}(x_t))] by Gauss-Hermite quadrature; ``pi = None``
    samples from q_(m,b) itself. ``kind``: ``x0sq`` = ||f_p - f_q||^2 (SiD's x0 units), ``huber`` =
    pseudo-Huber of the score difference."""
    z, n, w = _quadrature()
    pm, pb = pi if pi is not None else (m, b)
    t = TEACHER_1D.process.t_from_rho(torch.tensor(sigma))
    x_t = pm + pb * z + sigma * n
    diff = TEACHER_1D(x_t, t) - _fake(m, b)(x_t, t)
    if kind == "x0sq":
        d = diff**2
    else:
        y = diff / sigma**2
        d = (y**2 + C_HUBER**2).sqrt() - C_HUBER
    return float((w * d.reshape(-1)).sum())


def _fd_grad(m, b, sigma, kind, fixed_pi, h=1e-4):
    pi = (m, b) if fixed_pi else None
    return np.array([
        (_divergence(m + h, b, sigma, kind, pi) - _divergence(m - h, b, sigma, kind, pi)) / (2 * h),
        (_divergence(m, b + h, sigma, kind, pi) - _divergence(m, b - h, sigma, kind, pi)) / (2 * h),
    ])


def _surrogate_grad(cfg, m0, b0, sigma):
    z, n, w = _quadrature()
    obj = build_objective(cfg)
    m = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    x = m + b * z
    t = TEACHER_1D.process.t_from_rho(torch.tensor(sigma)).expand(len(w))
    loss, _ = obj.per_sample_loss(x, t, n, None, Roles(teacher=TEACHER_1D, fake=_fake(m0, b0)))
    return np.array([g.item() for g in torch.autograd.grad((w * loss).sum(), (m, b))])


# Measured (60x60 nodes, h = 1e-4, m=0.3, b=0.8): relative error <= 7e-8 for all eight cases
# (sigma 0.7 and 2.0); quadrature and central differences are far below the 1e-5 tolerance, while
# the wrong pairings below are off by 16-18 % (detached u_t: 50 %).
RTOL = 1e-5
FD_CASES = [
    # SiD alpha = 1: fixed-pi gradient of E||f_p - f_q||^2 / 2 (x0 units, omega off)
    ({"name": "sid", "alpha": 1.0, "weighting": "none"}, "x0sq", True, 0.5),
    # SiD alpha = 1/2: total derivative of the same divergence
    ({"name": "sid", "alpha": 0.5, "weighting": "none"}, "x0sq", False, 0.5),
    # SIM surrogate: fixed-pi gradient of the pseudo-Huber score divergence
    ({"name": "sim", "huber_c": C_HUBER, "weighting": "none"}, "huber", True, 1.0),
    # SIM surrogate + pathwise <sg(u), y(x_t)>: total derivative
    ({"name": "sim", "huber_c": C_HUBER, "weighting": "none", "pathwise": True}, "huber", False, 1.0),
]


@pytest.mark.parametrize("sigma", [0.7, 2.0])
@pytest.mark.parametrize("cfg,kind,fixed_pi,scale", FD_CASES)
def test_surrogate_matches_divergence_gradient(cfg, kind, fixed_pi, scale, sigma):
    m0, b0 = 0.3, 0.8
    got = _surrogate_grad(cfg, m0, b0, sigma)
    want = scale * _fd_grad(m0, b0, sigma, kind, fixed_pi)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < RTOL, f"{cfg} sigma={sigma}: surrogate {got} vs finite differences {want} (rel {err:.2e})"


def test_finite_difference_check_discriminates():
    """The wrong pairings fail the same check: SiD alpha=1 is not the total derivative, SIM without
    the pathwise term is not either, and SIM with u_t detached is not the fixed-pi gradient."""
    m0, b0, s = 0.3, 0.8, 0.7
    got = _surrogate_grad(FD_CASES[0][0], m0, b0, s)
    want = 0.5 * _fd_grad(m0, b0, s, "x0sq", fixed_pi=False)
    assert np.abs(got - want).max() / np.abs(want).max() > 0.1
    got = _surrogate_grad(FD_CASES[2][0], m0, b0, s)
    want = _fd_grad(m0, b0, s, "huber", fixed_pi=False)
    assert np.abs(got - want).max() / np.abs(want).max() > 0.1


def test_sim_detached_direction_is_wrong(monkeypatch):
    m0, b0, s = 0.3, 0.8, 0.7
    want = _fd_grad(m0, b0, s, "huber", fixed_pi=True)
    orig = sim_module.pseudo_huber_direction
    monkeypatch.setattr(sim_module, "pseudo_huber_direction", lambda y, c: orig(y, c).detach())
    got = _surrogate_grad(FD_CASES[2][0], m0, b0, s)
    assert np.abs(got - want).max() / np.abs(want).max() > 0.1


# -- stop-gradient placement: through both networks, only omega detached ----------------------------------
class _Detached(torch.nn.Module):
    """A denoiser whose output carries no gradient back to x_t."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.process = inner.process

    def forward(self, x_t, t, cond=None):
        return self.inner(x_t, t, cond).detach()

    def guided(self, x_t, t, cond, w):
        return self.inner.guided(x_t, t, cond, w).detach()


def _ring_setup(seed=0, b=64):
    g = _rng(seed)
    teacher = GMMTeacher(**PRESETS["ring8"]())
    fake = GMMTeacher(teacher.means * 0.8, 0.5)  # a different, smooth "current" distribution
    x = (torch.randn(b, 2, generator=g) * 1.5).requires_grad_(True)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.8
    noise = torch.randn(b, 2, generator=g)
    return teacher, fake, x, t, noise


def _grad_x(loss, x):
    return torch.autograd.grad(loss, x)[0]


def test_sid_backpropagates_through_both_networks_and_detaches_only_omega():
    teacher, fake, x, t, noise = _ring_setup()
    alpha = 1.2
    obj = build_objective({"name": "sid", "alpha": alpha})
    g_obj = _grad_x(obj.per_sample_loss(x, t, noise, None, Roles(teacher=teacher, fake=fake))[0].mean(), x)

    # reference: the official formula written out, omega detached, nothing else
    def ref(detach_omega=True, detach_real=False, detach_fake=False):
        x_t = teacher.process.add_noise(x, noise, t)
        fr, ff = teacher(x_t, t), fake(x_t, t)
        fr = fr.detach() if detach_real else fr
        ff = ff.detach() if detach_fake else ff
        om = (x - fr).abs().mean(1, keepdim=True).clamp(min=1e-5)
        om = om.detach() if detach_omega else om
        return (((fr - ff) * ((fr - x) - alpha * (fr - ff))) / om).mean()

    torch.testing.assert_close(g_obj, _grad_x(ref(), x), rtol=1e-5, atol=1e-7)
    for variant in ({"detach_omega": False}, {"detach_real": True}, {"detach_fake": True},
                    {"detach_real": True, "detach_fake": True}):
        g = _grad_x(ref(**variant), x)
        assert (g - g_obj).abs().max() > 1e-3 * g_obj.abs().max(), f"{variant} gives the same gradient"
    # the objective itself: detaching the networks' outputs changes its gradient
    roles_det = Roles(teacher=_Detached(teacher), fake=_Detached(fake))
    g_det = _grad_x(obj.per_sample_loss(x, t, noise, None, roles_det)[0].mean(), x)
    assert (g_det - g_obj).abs().max() > 1e-3 * g_obj.abs().max()


def test_sim_backpropagates_through_both_networks():
    teacher, fake, x, t, noise = _ring_setup(1)
    obj = build_objective({"name": "sim"})
    g_obj = _grad_x(obj.per_sample_loss(x, t, noise, None, Roles(teacher=teacher, fake=fake))[0].mean(), x)
    for roles in (Roles(teacher=_Detached(teacher), fake=fake), Roles(teacher=teacher, fake=_Detached(fake))):
        g = _grad_x(obj.per_sample_loss(x, t, noise, None, roles)[0].mean(), x)
        assert (g - g_obj).abs().max() > 1e-3 * g_obj.abs().max()


def test_sim_quadratic_limit_is_sid_alpha_one():
    """Large c: u ~ y/c, so SIM (weighting sid) -> SiD(alpha=1)/c, value and gradient."""
    teacher, fake, x, t, noise = _ring_setup(2)
    c = 1e6
    roles = Roles(teacher=teacher, fake=fake)
    sim, sid = build_objective({"name": "sim", "huber_c": c}), build_objective({"name": "sid", "alpha": 1.0})
    l_sim = sim.per_sample_loss(x, t, noise, None, roles)[0].mean()
    l_sid = sid.per_sample_loss(x, t, noise, None, roles)[0].mean() / c
    torch.testing.assert_close(l_sim * c, l_sid * c, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(_grad_x(l_sim * c, x), _grad_x(l_sid * c, x), rtol=1e-3, atol=1e-6)


def test_sid_alpha_warmup():
    obj = build_objective({"name": "sid", "alpha": 1.2, "alpha_warmup_steps": 100})
    assert obj.alpha_at(0) == 1.0 and obj.alpha_at(99) == 1.0 and obj.alpha_at(100) == 1.2


# -- CFG: the teacher is the canonical guided prediction (w = 1 is in test_contract.py) -------------------
@pytest.mark.parametrize("name", ["sid", "sim"])
def test_teacher_is_canonical_cfg(name):
    teacher = GMMTeacher(**PRESETS["ring8_cond"]())
    fake = GMMTeacher(teacher.means * 0.8, 0.5)
    g = _rng(3)
    x = torch.randn(64, 2, generator=g)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.8
    noise = torch.randn(64, 2, generator=g)
    cond = torch.randint(0, 4, (64,), generator=g)

    class Manual(torch.nn.Module):  # canonical CFG written out
        process = teacher.process

        def guided(self, x_t, t, c, w):
            return cfg_combine(teacher(x_t, t, torch.full_like(c, -1)), teacher(x_t, t, c), w)

    def loss(w, t_role):
        obj = build_objective({"name": name, "guidance_scale": w})
        return obj.per_sample_loss(x, t, noise, cond, Roles(teacher=t_role, fake=fake))[0]

    torch.testing.assert_close(loss(3.0, teacher), loss(3.0, Manual()), rtol=1e-5, atol=1e-6)
    assert (loss(3.0, teacher) - loss(1.0, teacher)).abs().max() > 1e-3


# -- SiDA wiring ---------------------------------------------------------------------------------------
def test_sida_losses():
    torch.manual_seed(0)
    teacher = GMMTeacher(**PRESETS["ring8"]())
    fake = MLPDenoiser(teacher.process, 2, width=32, depth=2, sigma_data=teacher.data_std())
    head = DiscriminatorHead(32, width=16)
    roles = Roles(teacher=teacher, fake=fake, discriminator=head)
    obj = build_objective({"name": "sida", "lsg_gan": 50.0})
    assert obj.requirements() == {"fake_score", "discriminator", "real_data"}
    x = torch.randn(32, 2, requires_grad=True)
    real = teacher.sample(32, generator=_rng(4))

    # generator: GAN term reaches x through the frozen fake network; without it it is 0.5 * SiD
    fake.requires_grad_(False)
    head.requires_grad_(False)
    out = obj.generator_loss(Batch(x=x, real=real, rng=_rng(5)), roles)
    sid = build_objective({"name": "sid", "alpha": 1.0}).generator_loss(Batch(x=x, rng=_rng(5)), roles)
    torch.testing.assert_close(out["loss_sid"], sid["loss"])
    want = 0.5 * out["loss_sid"] + 0.5 * (50.0 / 100.0) * out["loss_gan_gen"]
    torch.testing.assert_close(out["loss"].detach(), want)
    g_full = _grad_x(out["loss"], x)
    g_sid = _grad_x(0.5 * sid["loss"], x)
    assert (g_full - g_sid).abs().max() > 1e-6

    # auxiliary: real and fake samples are noised at the same t and noise (official SiDA): with
    # real == fake the discriminator sees identical inputs for both
    seen = []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    obj.auxiliary_losses(Batch(x=x.detach(), real=x.detach().clone(), rng=_rng(7)), roles)
    hook.remove()
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)

    # auxiliary: DSM + discriminator, gradients on the fake network and the head
    fake.requires_grad_(True)
    head.requires_grad_(True)
    aux = obj.auxiliary_losses(Batch(x=x.detach(), real=real, rng=_rng(6)), roles)
    aux["loss"].backward()
    assert all(p.grad is not None for p in head.parameters())
    assert torch.isfinite(aux["loss"]) and 0 <= float(aux["disc_acc"]) <= 1


def test_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match="objective.weighting"):
        build_objective({"name": "sid", "weighting": "bogus"})
    with pytest.raises(ConfigError, match="objective.huber_c"):
        build_objective({"name": "sim", "huber_c": 0.0})
    with pytest.raises(ConfigError, match="objective.alpha_warmup_steps"):
        build_objective({"name": "sid", "alpha_warmup_steps": -1})


def test_default_time_is_sid_sigma_range():
    """EDM canonical t ~ U[0, 0.8] is SiD's sigma(u), u <= 800/1000: sigma in [0.002, ~24.4]."""
    teacher = GMMTeacher(**PRESETS["ring8"]())
    for name in ("sid", "sida", "sim"):
        obj = build_objective({"name": name})
        t = obj.sample_t(Batch(x=torch.zeros(4096, 2), rng=_rng(7)), teacher.process)
        s = teacher.process.sigma(t)
        assert s.min() >= 0.002 and s.max() <= 24.5 and s.max() > 20


def test_dm_normaliser_is_detached():
    x = torch.randn(4, 3, requires_grad=True)
    assert not dm_normaliser(x, x * 0.5).requires_grad


# The sid recipe's distribution test is tests/bench/test_toy_fidelity.py (asym and gmm16d: mode widths and every
# mode at the recipe's budget); ring8 coverage of SiD: tests/objectives/test_fewstep_coverage.py (SiD^2).


def test_fake_time_default_is_sid_lognormal_and_overridable():
    from scoredistill.process.time import LogNormal, Uniform

    for name in ("sid", "sida", "sim"):
        assert build_objective({"name": name}).fake_time == LogNormal(p_mean=-1.2, p_std=1.2)
        obj = build_objective({"name": name, "fake_time": {"kind": "uniform", "t_min": 0.0, "t_max": 1.0}})
        assert obj.fake_time == Uniform(t_min=0.0, t_max=1.0)
