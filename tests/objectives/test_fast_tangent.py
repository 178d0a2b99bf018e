"""The fast forward-mode JVP (models/tangent.py) behind ``Tangent("torch")``: dual tensors with closed-form rules
for linear, convolution, SiLU, LayerNorm, GroupNorm and constant arithmetic. Its tangent equals
``torch.func.jvp``'s (torch's own rules) to float rounding on the MLP and the UNet, its primal and the
parameter gradients through it are bit-identical to a plain forward, every rule agrees with torch in
float64 (including the cases that must keep torch's rule), and the pass runs none of the zero-tangent
decompositions that made torch's rules slow."""

import pytest
import torch
import torch.profiler
from torch import nn
from torch.nn import functional as F

from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.tangent import dual_jvp
from scoredistill.models.unet import UNetDenoiser
from scoredistill.objectives import consistency_core as cc
from scoredistill.process import EDM, VPDiscrete
from scoredistill.process.trigflow import TrigFlow

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative L2 distance to torch.func.jvp's tangent, worst of 5 seeds on these nets (EDM and VP): float32 MLP
# 6.6e-7, UNet 7.1e-7; float64 2.1e-15. Bounds 7x above (float32) and 1e-12 (float64).
TOL = {torch.float32: 5e-6, torch.float64: 1e-12}


def _net(kind, process, dtype, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        net = MLPDenoiser(process, dim=3, width=32, depth=2, sigma_data=0.5, emb_dim=16)
    else:
        net = UNetDenoiser(process, image_shape=(1, 8, 8), channels=(8, 16), emb_dim=16)
    with torch.no_grad():  # zero-initialised output layers would make every tangent trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(dtype)


def _batch(kind, process, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3) if kind == "mlp" else (n, 1, 8, 8)
    x = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = process.t_from_rho(torch.exp(-1.0 + 1.4 * torch.randn(n, generator=g, dtype=torch.float64)))
    return x, t, torch.randn(shape, generator=g, dtype=torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "unet"])
@pytest.mark.parametrize("proc", ["edm", "vp"])
def test_scm_tangent_equals_torch_func_jvp(kind, dtype, proc):
    p = EDM() if proc == "edm" else VPDiscrete()
    net, trig = _net(kind, p, dtype), TrigFlow(p, 0.5)
    x_tau, t, dx = _batch(kind, p)
    fast = cc.Tangent("torch")
    F_a, d_a = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, fast)
    F_b, d_b = cc.scm_F_and_tangent(trig, net, x_tau, t, dx, cc.Tangent("torch", native=True))
    assert not fast._dual_failed  # the dual pass ran, not the fallback
    assert torch.equal(F_a, F_b)
    assert d_b.norm() > 0 and _rel(d_a, d_b) < TOL[dtype]


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_primal_and_parameter_gradients_are_bit_identical_to_a_plain_forward(kind):
    p = EDM()
    net, trig = _net(kind, p, torch.float32), TrigFlow(p, 0.5)
    x_tau, t, dx = _batch(kind, p)
    f = lambda x, tt: trig.F(net, x, tt, dtype=torch.float32)  # noqa: E731
    grads = []
    for fast in (True, False):
        net.zero_grad()
        y = dual_jvp(f, (x_tau, t), (dx, torch.ones_like(t)))[0] if fast else f(x_tau, t)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append((y.detach(), [q.grad.clone() for q in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_bf16_autocast_keeps_the_primal_and_a_bf16_accurate_tangent(kind):
    """Under autocast (``train.precision: bf16``) the norms run where autocast puts them (float32), so the primal
    is the plain autocast forward's; the tangent is bf16-accurate: relative distance to the float32 tangent
    measured 0.8-1.3e-2 (MLP) and 2.7-3.3e-2 (UNet) over 3 seeds, bound 0.1. (``torch.func.jvp`` itself fails
    on the UNet under CPU autocast: a float32 tangent meets a bfloat16 convolution weight.)"""
    p = EDM()
    net, trig = _net(kind, p, torch.float32), TrigFlow(p, 0.5)
    x_tau, t, dx = _batch(kind, p)
    f = lambda x, tt: trig.F(net, x, tt, dtype=torch.float32)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dy = dual_jvp(f, (x_tau, t), (dx, torch.ones_like(t)))
        y_plain = f(x_tau, t)
    assert torch.equal(y, y_plain)
    assert _rel(dy, torch.func.jvp(f, (x_tau, t), (dx, torch.ones_like(t)))[1]) < 0.1


class _AllRules(nn.Module):
    """Every rule, the argument forms they parse, and cases that must keep torch's rule (in-place SiLU, GELU,
    a dual weight, an operand pair that is both dual)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.c1 = nn.Conv1d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(1, 1, 1, bias=False)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x, s):
        h = self.lin(x) * s[:, None]
        h = F.silu(self.ln(h)) + F.layer_norm(h, (6,), eps=1e-3) + F.gelu(h)
        h = 2.0 - h / 3 + torch.ones(6, dtype=h.dtype) * h - 1.5 / (h * h + 1) + torch.mul(h, 0.5)
        h = h + torch.atan2(s, torch.full_like(s, 0.7))[:, None] + torch.atan2(torch.full_like(s, 0.3), s)[:, None]
        h = h.float().double() + torch.ones(6, dtype=torch.float64)  # promotion and broadcast of a constant
        k = self.c1(h[:, None]).reshape(len(h), 2, 2, 3)
        k = self.gn(torch.cat([k, F.silu(k.clone(), inplace=True)], 1))
        k = F.group_norm(self.c2(k), 2) + F.linear(x, self.lin.weight * s.mean())[:, :1, None, None]
        return self.c3(k[:, None]).flatten(1).sum(1, keepdim=True) + k.flatten(1)


def test_every_rule_equals_torch_in_float64():
    torch.manual_seed(0)
    m = _AllRules().double()
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.randn_like(s))
    y, dy = dual_jvp(m, (x, s), tangents)
    y_ref, dy_ref = torch.func.jvp(m, (x, s), tangents)
    assert torch.equal(y, y_ref) and _rel(dy, dy_ref) < 1e-12
    wrong = torch.func.jvp(m, (x, s), (tangents[0], torch.zeros_like(s)))[1]
    assert _rel(wrong, dy_ref) > 1e-2  # the comparison can fail


def _profiled_ops(run) -> set[str]:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.name for e in prof.events()}


def test_the_dual_pass_runs_no_zero_tangent_decompositions():
    """torch's rule for ``x (op) constant`` materialises a zero tangent whose arithmetic runs a Python
    decomposition (``prims::*`` ops, ~0.2 ms each): the cost the rules remove from the preconditioning code."""
    p = EDM()
    runs = []
    for kind in ("mlp", "unet"):
        net, trig = _net(kind, p, torch.float32), TrigFlow(p, 0.5)
        x_tau, t, dx = _batch(kind, p, n=2)
        runs.append(((lambda n, tr: lambda x, tt: tr.F(n, x, tt, dtype=torch.float32))(net, trig), x_tau, t, dx))
    slow = {"aten::_efficientzerotensor", "prims::mul", "prims::add"}
    fast = _profiled_ops(lambda: [dual_jvp(f, (x, t), (dx, t)) for f, x, t, dx in runs])
    assert not fast & slow, fast & slow
    x = torch.ones(3, dtype=torch.float64)
    assert _profiled_ops(lambda: torch.func.jvp(lambda v: v * 0.5 + 1.0, (x,), (x,))) & slow  # it can fail
