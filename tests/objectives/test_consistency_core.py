"""Building blocks of the consistency family (objectives/consistency_core.py): parameterisation and
boundary condition, pseudo-Huber, iCT discretisation and curriculum, the teacher ODE step, the sCM
tangent by torch.func.jvp and by float64 finite differences (same tangent, same loss gradient on the
MLP and the UNet), the one-line error / one-line fallback for networks without forward-mode AD, the
adaptive weight, MeanFlow's identity and TCM's boundary target. Exact GMM teachers are the oracle."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser, expand_t
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.unet import UNetDenoiser
from scoredistill.objectives import consistency_core as cc
from scoredistill.process import EDM, RectifiedFlow, VPDiscrete
from scoredistill.process.trigflow import TrigFlow
from scoredistill.sampling import sample_euler, sample_heun
from scoredistill.teachers.gmm import GMMTeacher, build_gmm

pytestmark = pytest.mark.usefixtures("one_thread")

PROCESSES = {"edm": EDM(), "vp": VPDiscrete(), "flow": RectifiedFlow(shift=3.0)}

# Tolerances: about 10x the values measured on this file's nets (relative L2 over the batch, fd_step 1e-4,
# docs/objectives/consistency.md). Tangent, float64 finite difference vs float64 JVP: UNet 1.6e-6,
# MLP 1.5e-4 (MLPDenoiser computes its time embedding from c_noise.float(), so the time step of the
# difference is rounded to float32); float32 JVP vs float64 JVP: 1.3e-6. Loss gradient w.r.t. the
# parameters, finite difference vs JVP: UNet 6.5e-7, MLP 1.9e-5.
TOL_TANGENT = {"mlp": 1e-3, "unet": 2e-5}
TOL_GRAD = {"mlp": 2e-4, "unet": 1e-5}


def _perturbed(net: nn.Module, scale=0.05, seed=0):
    """Zero-initialised output layers make a fresh net's F constant; perturb every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def _net(kind, process):
    if kind == "mlp":
        return _perturbed(MLPDenoiser(process, dim=3, width=32, depth=2, sigma_data=0.5, emb_dim=16))
    return _perturbed(UNetDenoiser(process, image_shape=(1, 8, 8), channels=(8, 16), emb_dim=16))


def _data(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3) if kind == "mlp" else (n, 1, 8, 8)
    return 0.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _times(process, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return process.t_from_rho(torch.exp(-0.8 + 1.2 * torch.randn(n, generator=g, dtype=torch.float64)))


# -- parameterisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCESSES))
def test_boundary_condition_is_exact(name):
    p = PROCESSES[name]
    net = _perturbed(MLPDenoiser(p, dim=3, width=32, depth=2))
    t0 = torch.tensor(0.05 if name != "flow" else 0.01, dtype=torch.float64)
    rho_min = float(p.rho(t0))
    x = torch.randn(8, 3)
    f = cc.consistency_function(net, x, t0, rho_min=rho_min)
    y = (x.double() / p.alpha(t0)).to(x.dtype)  # the VE state x_t / a_t; x itself for EDM
    assert torch.equal(f, y)
    if name == "edm":
        assert torch.equal(f, x)


def test_consistency_function_is_cskip_x_plus_cout_backbone():
    """``f = c_skip y + c_out F`` with ``F`` the MLP's raw backbone output (EDM preconditioning read back)."""
    p = EDM()
    net = _perturbed(MLPDenoiser(p, dim=3, width=32, depth=2, sigma_data=0.5))
    x, t, rho_min = torch.randn(16, 3), torch.rand(16, dtype=torch.float64) * 0.9 + 0.05, 0.002
    y, c_in, _, _, e = net._precond(x, t, None)
    F = net.net((c_in * y).float(), e).double()
    c_skip, c_out = cc.cm_coefficients(p.rho(t)[:, None], 0.5, rho_min)
    expect = c_skip * y + c_out * F
    assert torch.allclose(cc.consistency_function(net, x, t, rho_min=rho_min).double(), expect, atol=2e-6)
    # far from the boundary the consistency function is (nearly) the denoiser: CD initialises from it
    t_hi = torch.full((16,), 0.8, dtype=torch.float64)
    assert torch.allclose(cc.consistency_function(net, x, t_hi, rho_min=rho_min), net(x, t_hi), atol=1e-3)


# -- distance ---------------------------------------------------------------------------------------------
def test_pseudo_huber_limits():
    c = cc.ict_huber_c(3 * 32 * 32)
    assert abs(c - 0.02993) < 1e-4  # iCT's CIFAR-10 value (c = 0.03)
    d = 3072
    x = torch.zeros(4, d, dtype=torch.float64)
    dirs = torch.randn(4, d, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    small, large = 1e-4 * c, 1e4 * c
    # r << c: L2 / 2c
    v = cc.pseudo_huber(x + small * dirs, x, c)
    assert torch.allclose(v, torch.full((4,), small**2 / (2 * c), dtype=torch.float64), rtol=1e-6)
    # r >> c: r - c (L1-like), and the gradient has unit norm
    y = (x + large * dirs).requires_grad_(True)
    v = cc.pseudo_huber(y, x, c)
    assert torch.allclose(v, torch.full((4,), large - c, dtype=torch.float64), rtol=1e-6)
    v.sum().backward()
    assert torch.allclose(y.grad.norm(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-7)
    # the stable form equals the textbook one where both are accurate
    r = torch.randn(4, d, dtype=torch.float64)
    naive = (r.pow(2).sum(1) + c * c).sqrt() - c
    assert torch.allclose(cc.pseudo_huber(r, torch.zeros_like(r), c), naive, rtol=1e-12)


# -- iCT discretisation ----------------------------------------------------------------------------------
def test_karras_levels_and_edm_times():
    lv = cc.karras_levels(11)
    assert lv.shape == (11,) and (lv[1:] > lv[:-1]).all()
    assert abs(float(lv[0]) - 0.002) < 1e-12 and abs(float(lv[-1]) - 80.0) < 1e-9
    # EDM's canonical time is the Karras ramp: the levels sit on the uniform grid i/(n-1)
    t = cc.level_times(EDM(), lv)
    assert torch.allclose(t, torch.linspace(0, 1, 11, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cc.pair_weight(lv, torch.tensor([0, 9])), 1 / (lv[[1, 10]] - lv[[0, 9]]))


def test_ict_curriculum_doubles():
    total = 400_000  # iCT's CIFAR-10 schedule: 8 stages of 50k steps
    assert cc.ict_num_levels(0, total) == 11
    assert cc.ict_num_levels(49_999, total) == 11
    assert cc.ict_num_levels(50_000, total) == 21
    assert cc.ict_num_levels(100_000, total) == 41
    assert cc.ict_num_levels(350_000, total) == 1281
    assert cc.ict_num_levels(total - 1, total) == 1281
    assert cc.ict_num_levels(10 * total, total) == 1281  # capped at s1 + 1


def test_lognormal_index_sampling():
    lv = cc.karras_levels(41)
    probs = cc.lognormal_index_probs(lv, -1.1, 2.0)
    normal = torch.distributions.Normal(torch.tensor(-1.1, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    mass = normal.cdf(lv[1:].log()) - normal.cdf(lv[:-1].log())
    assert torch.allclose(probs, mass / mass.sum(), atol=1e-12)
    # the sampler draws with these probabilities (4-sigma binomial bound per index)
    n = 200_000
    idx = cc.sample_pair_indices(n, lv, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=40).double() / n
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-9).all()
    # the mode of the index distribution sits where ln rho ~ P_mean
    peak = int(probs.argmax())
    assert lv[peak] < math.exp(-1.1) * 3 and lv[peak + 1] > math.exp(-1.1) / 3


# -- teacher ODE step --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_teacher_step_chain_equals_library_sampler(name, solver):
    p = PROCESSES[name]
    teacher = build_gmm({"preset": "ring8"}, p)
    rmin, rmax = max(p.rho_min, 0.002), min(p.rho_max, 80.0)
    lv = cc.karras_levels(12, rmin, rmax)
    ts = cc.level_times(p, lv)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    x = (p.alpha(ts[-1]) * lv[-1] * z.double()).float()  # x_t at the top level, y = rho_max z
    for i in range(len(lv) - 1, 0, -1):
        x = cc.teacher_ode_step(teacher, x, ts[i], ts[i - 1], solver)
    fn = sample_heun if solver == "heun" else sample_euler
    ref = fn(teacher, z, lv.flip(0))  # the same levels, no final step to 0: ends at y(rho_min)
    assert torch.allclose((x.double() / p.alpha(ts[0])).float(), ref, atol=2e-5)


def _exact_consistency(teacher, rho_min, steps=64):
    """``f(x_t, t)``: the teacher PF-ODE solution at ``rho_min`` (EDM), ``steps`` Heun steps per sample."""

    def f(x, t):
        p = teacher.process
        r0 = p.rho(t)
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        lvls = (r0[:, None] ** (1 / 7) + ramp[None] * (rho_min ** (1 / 7) - r0[:, None] ** (1 / 7))) ** 7
        for k in range(steps):
            x = cc.teacher_ode_step(teacher, x, p.t_from_rho(lvls[:, k]), p.t_from_rho(lvls[:, k + 1]), "heun")
        return x

    return f


def _cd_loss(teacher, f_student, f_target, levels, n, seed):
    """CD: ``lambda(rho_i) d(f(x_{i+1}), f^-(x^_i))`` with ``x^_i`` one teacher Heun step from ``x_{i+1}``."""
    g = torch.Generator().manual_seed(seed)
    p = teacher.process
    x0 = teacher.sample(n, generator=g).double()
    idx = cc.sample_pair_indices(n, levels, generator=g)
    t_hi, t_lo = cc.level_times(p, levels[idx + 1]), cc.level_times(p, levels[idx])
    x_hi = p.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t_hi)
    x_lo = cc.teacher_ode_step(teacher, x_hi, t_hi, t_lo, "heun")
    d = cc.pseudo_huber(f_student(x_hi, t_hi), f_target(x_lo, t_lo), cc.ict_huber_c(x0[0].numel()))
    return float((cc.pair_weight(levels, idx) * d).mean())


def test_cd_loss_vanishes_for_exact_consistency_function():
    """The exact PF-ODE map has a CD loss that is only the teacher step's discretisation error: small
    next to wrong maps, and shrinking fast as the grid is refined (measured: 0.0128 at 18 levels,
    0.0010 at 40; the denoiser as a 'consistency function' stays at 0.26)."""
    teacher = build_gmm({"preset": "pair"}, EDM())
    good = {}
    for n in (18, 40):
        levels = cc.karras_levels(n)
        exact = _exact_consistency(teacher, float(levels[0]))
        good[n] = _cd_loss(teacher, exact, exact, levels, 256, seed=0)
    # wrong: the teacher's one-step denoiser (not constant along ODE paths), and a flipped ODE
    denoise = lambda x, t: teacher(x, t)  # noqa: E731
    flipped = lambda x, t: 2 * x - exact(x, t)  # noqa: E731
    bad1 = _cd_loss(teacher, denoise, denoise, levels, 256, seed=0)
    bad2 = _cd_loss(teacher, flipped, flipped, levels, 256, seed=0)
    assert good[40] < 0.01 * min(bad1, bad2), (good, bad1, bad2)
    assert good[40] < good[18] / 5


# -- sCM tangent: torch.func.jvp vs float64 finite differences -------------------------------------------
def _scm_setup(kind, name, n=8):
    p = PROCESSES[name]
    net = _net(kind, p)
    trig = TrigFlow(p, 0.5)
    x0, eps = _data(kind, n)
    t = _times(p, n)
    tau = trig.tau(t)
    return net, trig, t, tau, trig.add_noise(x0, eps, tau), trig.velocity_target(x0, eps, tau)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mlp", "unet"])
@pytest.mark.parametrize("name", ["edm", "vp"])
def test_scm_tangent_jvp_equals_finite_difference(kind, name):
    net, trig, t, tau, x_tau, dx = _scm_setup(kind, name)
    F_j, dF_j = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("torch"))
    F_f, dF_f = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("fd"))
    ref = copy.deepcopy(net).double()
    _, dF_64 = cc.scm_F_and_tangent(trig, ref, x_tau, t, dx, cc.Tangent("torch"))
    assert torch.equal(F_j.detach(), F_f.detach())  # same primal either way
    assert _rel(dF_j, dF_64) < 2e-5  # float32 JVP vs float64 JVP
    assert _rel(dF_f, dF_64) < TOL_TANGENT[kind]
    assert _rel(dF_f, dF_j) < TOL_TANGENT[kind]
    # a wrong direction (time tangent dropped) is far off: the check can fail
    F_x = lambda m, x, tt: trig.F(m, x, tt, dtype=torch.float32)  # noqa: E731
    cs = torch.cos(tau) * torch.sin(tau)
    _, d_wrong = cc.Tangent("torch")(F_x, net, (x_tau, t), (cs.view(-1, *[1] * (dx.dim() - 1)) * dx,
                                                            torch.zeros_like(t)))
    assert _rel(d_wrong, dF_64) > 100 * TOL_TANGENT[kind]


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_scm_loss_gradient_jvp_equals_finite_difference(kind):
    grads = {}
    base, trig, t, tau, x_tau, dx = _scm_setup(kind, "edm")
    for mode in ("torch", "fd"):
        net = copy.deepcopy(base)
        F, dF = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent(mode))
        g = cc.normalize_tangent(cc.scm_tangent(trig, F, dF, x_tau, dx, tau, r=1.0))
        loss = cc.scm_loss(F, g, cc.scm_prior_weight(trig, tau)).mean()
        net.zero_grad()
        loss.backward()
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert grads["torch"].norm() > 0
    assert _rel(grads["fd"], grads["torch"]) < TOL_GRAD[kind]


def test_dropout_masks_agree_across_passes():
    """In training mode with dropout, the two finite-difference passes and the primal pass replay one RNG
    state (sCM's forked RNG), so the fd tangent still matches the JVP (which is one pass) and the primal
    F has the mask the tangent was taken with."""
    p = EDM()
    net = _perturbed(UNetDenoiser(p, image_shape=(1, 8, 8), channels=(8, 16), emb_dim=16, dropout=0.3)).train()
    trig = TrigFlow(p, 0.5)
    x0, eps = _data("unet", 4)
    t = _times(p, 4)
    tau = trig.tau(t)
    x_tau, dx = trig.add_noise(x0, eps, tau), trig.velocity_target(x0, eps, tau)
    torch.manual_seed(5)
    F_j, dF_j = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("torch"))
    torch.manual_seed(5)
    F_f, dF_f = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("fd"))
    assert torch.equal(F_j, F_f)
    assert _rel(dF_f, dF_j) < TOL_TANGENT["unet"]
    torch.manual_seed(5)
    with torch.no_grad():
        F_jvp_primal = torch.func.jvp(lambda x: trig.F(net, x, t, dtype=torch.float32), (x_tau.double(),),
                                      (dx.double(),))[0]
    assert torch.equal(F_j.detach(), F_jvp_primal)  # the same dropout mask as the tangent pass
    torch.manual_seed(6)
    F_other = trig.F(net, x_tau, t, dtype=torch.float32)
    assert not torch.allclose(F_other, F_j)  # dropout is active: another state gives another mask


def _gaussian_student(s, rho_min):
    """The exact consistency map of data ``N(0, s^2 I)`` as a denoiser: ``y sqrt(s^2+rho_min^2)/sqrt(s^2+rho^2)``."""

    class Exact(Denoiser):
        def __init__(self, process):
            super().__init__()
            self.process = process
            self.data_shape = (2,)

        def denoise(self, x_t, t, cond=None):
            t = expand_t(t, x_t.shape[0], x_t.device)
            a, rho = self.process.alpha(t)[:, None], self.process.rho(t)[:, None]
            return x_t.double() / a * ((s * s + rho_min**2) / (s * s + rho * rho)).sqrt()

    return Exact


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("mode", ["torch", "fd"])
def test_scd_tangent_vanishes_on_exact_consistency_map(name, mode):
    """sCD with an exact teacher: ``g = cos(tau) df/dtau`` is zero for the exact consistency function and
    not for the teacher's denoiser (which is not constant along ODE paths)."""
    p = PROCESSES[name]
    s = 0.7
    teacher = GMMTeacher([[0.0, 0.0]], s, process=p)
    trig = TrigFlow(p, 0.5)
    t = _times(p, 16)
    if name == "vp":
        # VPDiscrete's log alpha_bar is piecewise linear between its 1000 grid points: a central
        # difference that straddles a knot averages two slopes (measured 4e-6 relative), so keep the
        # finite-difference stencil (|dt| < 1e-4 here) off the knots
        t = t[((t * 1000) - (t * 1000).round()).abs() > 0.25]
    tau = trig.tau(t)
    x_tau = trig.to_trig(torch.randn(len(t), 2, dtype=torch.float64) * 2.0, t)
    dx = cc.teacher_velocity(trig, teacher, x_tau, t)
    exact = _gaussian_student(s, float(p.rho(p.t_min)))(p)
    scale = x_tau.norm()
    for student, zero in ((exact, True), (teacher, False)):
        F, dF = cc.scm_F_and_tangent(trig, student, x_tau, t, dx, cc.Tangent(mode))
        g = cc.scm_tangent(trig, F, dF, x_tau, dx, tau)
        if zero:
            assert float(g.norm() / scale) < (1e-12 if mode == "torch" else 3e-8)  # measured 3e-15 / 9e-9
        else:
            assert float(g.norm() / scale) > 1e-2


def test_tangent_warmup_and_normalisation():
    assert cc.tangent_warmup(0, 10_000) == 0.0 and cc.tangent_warmup(5_000, 10_000) == 0.5
    assert cc.tangent_warmup(20_000, 10_000) == 1.0 and cc.tangent_warmup(3, 0) == 1.0
    g = torch.randn(4, 3, 8, 8, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 10.0, 1e3]).view(4, 1, 1, 1)
    n = cc.normalize_tangent(g, 0.1).reshape(4, -1).norm(dim=1)
    raw = g.reshape(4, -1).norm(dim=1)
    assert torch.allclose(n, raw / (raw + 0.1))
    ni = cc.normalize_tangent(g, 0.1, size_invariant=True).reshape(4, -1).norm(dim=1)
    assert torch.allclose(ni, raw / (raw / math.sqrt(192) + 0.1))


def test_adaptive_weight_learns_log_of_loss_level():
    """Minimising ``L(tau)/e^{lv(tau)} + lv(tau)`` over the head drives ``lv -> ln L`` (sCM §4.3)."""
    torch.manual_seed(0)
    head = cc.AdaptiveWeight(0.5, channels=64)
    tau0 = torch.linspace(0.05, 1.5, 64, dtype=torch.float64)
    assert torch.equal(head(tau0), torch.zeros(64))  # zero-initialised: weight 1 at the start
    level = lambda tau: 0.2 + tau.float()  # noqa: E731 -- a per-time loss level, smooth in tau
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    for _ in range(400):
        tau = 0.05 + 1.45 * torch.rand(128, dtype=torch.float64)
        lv = head(tau)
        loss = (level(tau) / lv.exp() + lv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (head(tau0) - level(tau0).log()).abs().max()
    assert float(err) < 0.1
    # scm_loss adds the head with the same form
    F = torch.zeros(3, 2, requires_grad=True)
    g = torch.ones(3, 2, dtype=torch.float64)
    lv = torch.tensor([0.0, 1.0, -1.0])
    out = cc.scm_loss(F, g, 2.0, lv)
    assert torch.allclose(out, 2.0 * 1.0 / lv.double().exp() + lv.double())


# -- forward-mode failures -------------------------------------------------------------------------------
class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Fused(nn.Module):
    def forward(self, x):
        return _NoJvp.apply(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.block = nn.Sequential(nn.Linear(3, 3), _Fused())

    def forward(self, x, t):
        return self.block(self.lin(x) * t[:, None])


def _f(m, x, t):
    return m(x, t)


def test_jvp_torch_without_forward_rule_is_one_line():
    net = _Net().double()
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    with pytest.raises(ConfigError) as e:
        cc.Tangent("torch")(_f, net, (x, t), (torch.ones_like(x), torch.ones_like(t)))
    msg = str(e.value)
    assert msg.startswith("objective.jvp: ") and "\n" not in msg
    assert "block.1 (_Fused)" in msg and "jvp: fd" in msg


def test_jvp_auto_falls_back_with_one_warning_line():
    net = _Net().double()
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    tang = (torch.randn_like(x), torch.ones_like(t))
    auto = cc.Tangent("auto")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1, d1 = auto(_f, net, (x, t), tang)
        out2, d2 = auto(_f, net, (x, t), tang)
    msgs = [str(w.message) for w in rec if "objective.jvp" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "block.1 (_Fused)" in msgs[0]
    assert auto.active == "fd"
    _, d_fd = cc.Tangent("fd")(_f, net, (x, t), tang)
    assert torch.equal(d1, d_fd) and torch.equal(d2, d_fd)
    # the analytic directional derivative of this small net (tanh' = 1 - tanh^2)
    with torch.no_grad():
        h = net.lin(x) * t[:, None]
        dh = (net.lin.weight @ tang[0].T).T * t[:, None] + net.lin(x) * tang[1][:, None]
        u = net.block[0](h)
        du = (net.block[0].weight @ dh.T).T
        exact = (1 - u.tanh() ** 2) * du
    assert _rel(d1, exact) < 1e-7
    lines = []
    cc.Tangent("auto", log=lines.append)(_f, net, (x, t), tang)
    assert len(lines) == 1 and lines[0].startswith("objective.jvp: ")


def test_unknown_jvp_mode():
    with pytest.raises(ConfigError, match="objective.jvp: unknown value 'jax'; accepted: torch, fd, auto"):
        cc.Tangent("jax")


# -- MeanFlow -------------------------------------------------------------------------------------------
def test_meanflow_identity_on_exact_average_velocity():
    """Data ``N(0, s^2)`` under ``z_t = (1-t) x + t eps``: ODE paths scale with ``std(t)``, so
    ``u(z, r, t) = z (1 - std(r)/std(t)) / (t - r)`` exactly; MeanFlow's target ``v - (t-r) du/dt``
    must reproduce it, and at ``r = t`` the target is ``v`` itself."""
    s = 0.6
    std = lambda t: ((1 - t) ** 2 * s * s + t * t).sqrt()  # noqa: E731

    def u_exact(m, z, r, t):
        r_, t_ = r[:, None], t[:, None]
        return z * (1 - std(r_) / std(t_)) / (t_ - r_)

    g = torch.Generator().manual_seed(0)
    n = 32
    t = 0.2 + 0.75 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) * std(t)[:, None]
    v = z * ((t - (1 - t) * s * s) / std(t) ** 2)[:, None]  # d ln std / dt times z
    m = nn.Identity()
    # u(z, t, t) = v(z, t): the average velocity over a vanishing interval is the instantaneous one
    assert _rel(u_exact(m, z, t - 1e-7, t), v) < 1e-6
    for mode in ("torch", "fd"):
        u, target = cc.meanflow_target(u_exact, m, z, r, t, v, cc.Tangent(mode))
        assert _rel(target, u.double()) < (1e-12 if mode == "torch" else 1e-7)
        assert _rel(u.double(), v) > 1e-2  # the identity is not the trivial r = t case
    # r = t: the target is v for any network (plain flow matching)
    net = nn.Sequential(nn.Linear(4, 4)).double()
    u_net = lambda m, z, r, t: m(z) * (1 + t[:, None]) + r[:, None]  # noqa: E731
    _, target = cc.meanflow_target(u_net, net, z, t, t, v, cc.Tangent("torch"))
    assert torch.equal(target, v)


# -- TCM -------------------------------------------------------------------------------------------------
def test_tcm_split_sampler_and_boundary_target():
    p = EDM()
    t = cc.tcm_sample_times(4000, p, 0.3, 0.25, generator=torch.Generator().manual_seed(0))
    den, cons = cc.tcm_split(t, 0.3)
    assert abs(float(den.double().mean()) - 0.25) < 0.03
    assert float(t[den].max()) < 0.3 and float(t[cons].min()) >= 0.3
    x = torch.randn(6, 2)
    s = torch.tensor([0.1, 0.3, 0.31, 0.5, 0.2, 0.9], dtype=torch.float64)
    calls = []

    def target(xs, ss):
        calls.append(("target", ss.tolist()))
        return xs + 1

    def boundary(xs, ss):
        calls.append(("boundary", ss.tolist()))
        return xs - 1

    out = cc.tcm_pair_target(x, s, 0.3, target, boundary)
    at = s <= 0.3
    assert torch.equal(out[at], x[at] - 1) and torch.equal(out[~at], x[~at] + 1)
    assert calls == [("boundary", [0.1, 0.3, 0.2]), ("target", [0.31, 0.5, 0.9])]


# -- a tiny diffusers UNet2DConditionModel ------------------------------------------------------------------
@pytest.mark.slow
def test_diffusers_unet_scm_tangent(tmp_path):
    """On CPU the UNet's attention (``scaled_dot_product_attention``'s flash kernel) has no forward-mode
    rule: ``jvp: torch`` names the attention module, ``auto`` falls back to finite differences, and the
    fallback agrees with a JVP taken under the math attention kernel (which has one)."""
    pytest.importorskip("diffusers")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher
    from scoredistill.adapters.tiny import save_tiny

    path = save_tiny("sd15", str(tmp_path / "sd15"))
    net = build_diffusers_teacher({"kind": "diffusers", "path": path, "prompts": ["a cube", "a ball"]})
    trig = TrigFlow(net.process, 1.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *net.data_shape, generator=g)
    eps = torch.randn(2, *net.data_shape, generator=g)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    tau = trig.tau(t)
    x_tau, dx = trig.add_noise(x0, eps, tau), trig.velocity_target(x0, eps, tau)
    cond = torch.tensor([0, 1])
    try:
        cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("torch"), cond=cond)
        jvp_ok = True
    except ConfigError as e:
        jvp_ok = False
        assert "\n" not in str(e) and "jvp: fd" in str(e) and "(Attention)" in str(e)
    lines = []
    _, d_auto = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("auto", log=lines.append), cond=cond)
    assert len(lines) == (0 if jvp_ok else 1)
    with sdpa_kernel([SDPBackend.MATH]):
        _, d_math = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("torch"), cond=cond)
    assert torch.isfinite(d_auto).all() and _rel(d_auto, d_math) < 5e-3
