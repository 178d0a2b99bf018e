"""The registered consistency objectives (``scm``, ``cd``, ``ict``) and the engine's ``consistency_target`` role.

Building blocks are tested in test_consistency_core.py; here: the ``scm`` loss gradient is the same with the
tangent by ``torch.func.jvp`` and by float64 finite differences on the MLP and the UNet, one sCM step on a tiny
diffusers UNet, the one-line errors (``jvp: torch`` on a network without a forward-mode rule, ``auto``'s one
warning line, a teacher whose process has no TrigFlow form, a student without a time input), and the engine's
target copy: updated after every generator step (exact copy or EMA), checkpointed, restored bit-identically on
resume, and the student sampled in 1..K steps by ``scoredistill sample --steps``. One sCM step on a tiny diffusers
UNet is in tests/adapters/test_diffusers_edges.py (it shares that module's tiny pipelines)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers import distill_toy, last_checkpoint_tensors
from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.unet import UNetDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.process import EDM
from scoredistill.process.processes import Process

pytestmark = pytest.mark.usefixtures("one_thread")

# Loss gradient w.r.t. the student's parameters, finite difference vs JVP (relative L2), measured with
# the nets below: MLP 1.2e-5, UNet 5.6e-7 (tolerance ~10x; the MLP rounds its time embedding to float32).
TOL_GRAD = {"mlp": 2e-4, "unet": 1e-5}
# meanflow: the same comparison on the two-time MLP, measured 4.3e-6..5.2e-6 over 3 seeds (tolerance ~10x)
TOL_MEANFLOW = 5e-5


def _perturbed(net, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def _setup(kind, n=16):
    p = EDM()
    if kind == "mlp":
        net, shape = MLPDenoiser(p, dim=3, width=32, depth=2, sigma_data=0.5, emb_dim=16), (3,)
    else:
        net, shape = UNetDenoiser(p, image_shape=(1, 8, 8), channels=(8, 16), emb_dim=16), (1, 8, 8)
    student = _perturbed(net)
    teacher = _perturbed(copy.deepcopy(net), seed=3).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    real = 0.5 * torch.randn(n, *shape, generator=g)
    return teacher, student, real


def _scm_grad(obj, teacher, student, real, seed=0, step=100):
    student.zero_grad()
    target = copy.deepcopy(student).requires_grad_(False)
    b = Batch(x=torch.zeros_like(real), real=real, rng=torch.Generator().manual_seed(seed), step=step)
    out = obj.generator_loss(b, Roles(teacher=teacher, student=student, target=target))
    out["loss"].backward()
    return torch.cat([p.grad.reshape(-1) for p in student.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_scm_loss_gradient_jvp_equals_finite_difference(kind):
    teacher, student, real = _setup(kind)
    grads = {mode: _scm_grad(build_objective({"name": "scm", "jvp": mode, "adaptive": False}), teacher,
                             copy.deepcopy(student), real) for mode in ("torch", "fd")}
    assert grads["torch"].norm() > 0
    assert _rel(grads["fd"], grads["torch"]) < TOL_GRAD[kind]
    # the check can fail: sCT's data velocity instead of the teacher's gives another gradient
    sct = _scm_grad(build_objective({"name": "scm", "jvp": "torch", "adaptive": False, "velocity": "data"}),
                    teacher, copy.deepcopy(student), real)
    assert _rel(sct, grads["torch"]) > 100 * TOL_GRAD[kind]


class _NoJvp(torch.autograd.Function):
    """tanh without a forward-mode rule (a fused kernel stand-in)."""

    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Fused(nn.Module):
    def forward(self, x):
        return _NoJvp.apply(x)


def _fused_student():
    torch.manual_seed(0)
    net = _perturbed(MLPDenoiser(EDM(), dim=2, width=16, depth=1, sigma_data=0.5, emb_dim=8))
    net.net.out = nn.Sequential(_Fused(), net.net.out)
    return net


def test_scm_jvp_torch_names_the_module_and_auto_falls_back_once():
    teacher = _perturbed(MLPDenoiser(EDM(), dim=2, width=16, depth=1, sigma_data=0.5, emb_dim=8), seed=2)
    real = 0.5 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError) as e:
        _scm_grad(build_objective({"name": "scm", "jvp": "torch"}), teacher, _fused_student(), real)
    msg = str(e.value)
    assert msg.startswith("objective.jvp: ") and "\n" not in msg and "net.out.0 (_Fused)" in msg and "jvp: fd" in msg
    auto = build_objective({"name": "scm", "jvp": "auto", "adaptive": False})
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        g1 = _scm_grad(auto, teacher, _fused_student(), real)
        g2 = _scm_grad(auto, teacher, _fused_student(), real)
    lines = [str(w.message) for w in rec if "objective.jvp" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and "(_Fused)" in lines[0]
    g_fd = _scm_grad(build_objective({"name": "scm", "jvp": "fd", "adaptive": False}), teacher, _fused_student(), real)
    assert torch.isfinite(g1).all() and torch.equal(g1, g_fd) and torch.equal(g2, g_fd)


class _Bump(Process):
    """A schedule whose noise-to-signal ratio decreases on part of the range: no TrigFlow form."""

    name = "bump"

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return t + 0.3 * torch.sin(6.0 * t)

    def describe(self):
        return {"kind": "bump"}


def test_teacher_without_trigflow_form_is_one_line():
    from scoredistill.teachers.gmm import GMMTeacher

    class Probe(GMMTeacher):
        pass

    teacher = Probe([[0.0, 0.0]], 0.5)
    teacher.process = _Bump()
    with pytest.raises(ConfigError) as e:
        build_objective({"name": "scm"}).check_teacher(teacher)
    assert str(e.value).startswith("teacher.process: ") and "\n" not in str(e.value) and "TrigFlow" in str(e.value)
    build_objective({"name": "scm"}).check_teacher(GMMTeacher([[0.0, 0.0]], 0.5, process=EDM()))  # accepted


# -- the engine: target role, checkpoint, resume, sampling ------------------------------------------------------


def _split(tensors):
    gen = {k[len("model/generator/denoiser."):]: v for k, v in tensors.items()
           if k.startswith("model/generator/denoiser.")}
    tgt = {k[len("model/target/model."):]: v for k, v in tensors.items() if k.startswith("model/target/model.")}
    assert gen and set(gen) == set(tgt)
    return gen, tgt


def test_target_copy_is_checkpointed_and_resumed_bit_identically(tmp_path):
    """``scm`` (target = exact copy): 4 iterations straight and 2 + resume to 4 give the same checkpoint,
    target included; the target equals the student after every generator step; the student samples in
    1, 2 and 4 steps."""
    from scoredistill.cli.main import main

    warm = ["objective.warmup_steps=3"]
    distill_toy("scm", tmp_path / "full", 4, extra=warm)
    distill_toy("scm", tmp_path / "part", 2, extra=warm)
    distill_toy("scm", tmp_path / "part", 4, resume=True, extra=warm)
    a, b = last_checkpoint_tensors(tmp_path / "full"), last_checkpoint_tensors(tmp_path / "part")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    gen, tgt = _split(a)
    assert all(torch.equal(gen[k], tgt[k]) for k in gen)
    outs = {}
    for k in (1, 2, 4):
        main(["sample", str(tmp_path / "full"), "--n", "16", "--steps", str(k), "--out", str(tmp_path / f"s{k}.npy")])
        outs[k] = np.load(tmp_path / f"s{k}.npy")
        assert outs[k].shape == (16, 2) and np.isfinite(outs[k]).all()
    assert not np.array_equal(outs[1], outs[4])


def test_target_ema_lags_the_student(tmp_path):
    """``cd`` with ``target_ema: 0.5``: the checkpointed target is an average, not a copy, of the student."""
    distill_toy("cd", tmp_path / "r", 2, extra=["objective.target_ema=0.5"])
    gen, tgt = _split(last_checkpoint_tensors(tmp_path / "r"))
    assert not all(torch.equal(gen[k], tgt[k]) for k in gen)
    assert all(torch.isfinite(v).all() for v in tgt.values())


def test_student_without_time_input_is_one_line(tmp_path, capsys):
    from scoredistill.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "recipes/toy/scm.yaml", "--out", str(tmp_path / "r"), "--set", "generator.steps=null",
              "--set", "train.steps=1", "--set", "eval.n_samples=64", "--set", "train.progress=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: generator.steps: " in err[0] and "denoiser" in err[0], err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_ict_curriculum_and_cd_levels_follow_the_step():
    """iCT's number of levels doubles with the generator step (s0 = 10 -> 20 -> ... -> s1 = 40 here); CD's grid
    is fixed. Both read only real samples and their own target (the generator's samples are not used)."""
    torch.manual_seed(0)
    student = _perturbed(MLPDenoiser(EDM(), dim=2, width=16, depth=1, sigma_data=0.5, emb_dim=8))
    roles = Roles(teacher=student, student=student, target=copy.deepcopy(student))
    real = torch.randn(8, 2)
    obj = build_objective({"name": "ict", "s0": 10, "s1": 40, "curriculum_steps": 300})
    seen = [int(obj.generator_loss(Batch(x=real, real=real, rng=torch.Generator().manual_seed(0), step=s), roles)
                ["ict/levels"]) for s in (0, 99, 100, 200, 299)]
    assert seen == [11, 11, 21, 41, 41]
    assert not build_objective({"name": "cd"}).uses_generator_samples
    assert isinstance(student, Denoiser)


def test_rcm_adds_the_dmd_term_after_its_pure_scm_phase():
    """rCM = scm_weight * sCM + dmd_weight * DMD: before ``dmd_start`` the loss is exactly 100 x the sCM loss and
    the samples get no gradient; afterwards the DMD field reaches them."""
    from scoredistill.teachers.gmm import GMMTeacher

    teacher = GMMTeacher([[1.0, 0.0], [-1.0, 0.0]], 0.2, process=EDM())
    fake = GMMTeacher([[0.0, 0.5]], 0.5, process=EDM())
    torch.manual_seed(0)
    student = _perturbed(MLPDenoiser(EDM(), dim=2, width=16, depth=1, sigma_data=0.5, emb_dim=8))
    roles = Roles(teacher=teacher, fake=fake, student=student, target=copy.deepcopy(student))
    real = teacher.sample(16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    rcm = build_objective({"name": "rcm", "dmd_start": 5, "reduction": "mean"})
    scm = build_objective({"name": "scm", "adaptive": False})

    def call(obj, step):
        return obj.generator_loss(Batch(x=x, real=real, rng=torch.Generator().manual_seed(3), step=step), roles)

    early, ref = call(rcm, 4), call(scm, 4)
    assert torch.equal(early["loss"], 100 * ref["loss"]) and "loss_dm" not in early
    late = call(rcm, 5)
    (gx,) = torch.autograd.grad(late["loss"], x)
    assert "loss_dm" in late and gx.abs().max() > 0
    assert rcm.requirements() == {"consistency_target", "real_data", "fake_score"} and rcm.uses_generator_samples

    # rCM's code (the default, reduction: sum): per-sample sums, no prior or adaptive weight. The consistency
    # term's value is 100 x the batch mean of ||g||^2 (F_theta - sg F_theta = 0), and the DMD term's gradient
    # on the samples is 2 x (elements per sample) x the mean-reduced one (same fields: same generator seeds).
    summed = build_objective({"name": "rcm", "dmd_start": 5})
    assert summed.p.reduction == "sum" and not summed.p.adaptive
    _, g, _, _, _ = summed.consistency_terms(Batch(x=x, real=real, rng=torch.Generator().manual_seed(3), step=4),
                                             roles)
    early_sum = call(summed, 4)
    expect = 100 * g.double().reshape(len(g), -1).pow(2).sum(1).mean()
    assert torch.allclose(early_sum["loss"].double(), expect, rtol=1e-12)
    (gx_sum,) = torch.autograd.grad(call(summed, 5)["loss"], x)
    assert torch.allclose(gx_sum, 2 * x[0].numel() * gx, rtol=1e-5, atol=1e-12)
    for bad, key in (({"reduction": "max"}, "objective.reduction"), ({"adaptive": True}, "objective.adaptive")):
        with pytest.raises(ConfigError, match=key):
            build_objective({"name": "rcm", **bad})


# -- meanflow (arXiv 2505.13447) -------------------------------------------------------------------------
class _GaussFlowMap(Denoiser):
    """The exact two-time denoiser of N(mu, s^2 I) under EDM: the PF-ODE keeps ``(y - mu)/sqrt(s^2 + rho^2)``
    constant, so the flow map to ``r`` is closed form and ``D(x_t, t, r) = y - rho_t U`` with the exact average
    velocity ``U = (y - y_r)/(rho_t - rho_r)`` (its limit ``rho (y - mu)/(s^2 + rho^2)`` at ``r = t``)."""

    two_time = True

    def __init__(self, mu, s):
        super().__init__()
        self.process, self.data_shape, self.mu, self.s = EDM(), (len(mu),), torch.tensor(mu, dtype=torch.float64), s

    def denoise(self, x_t, t, cond=None, r=None):
        col = lambda v: v.reshape(-1, 1)  # noqa: E731
        rt = col(self.process.rho(t))
        rr = col(self.process.rho(r)) if r is not None else torch.zeros_like(rt)
        y, s2 = x_t.double(), self.s ** 2
        y_r = self.mu + (y - self.mu) * (s2 + rr ** 2).sqrt() / (s2 + rt ** 2).sqrt()
        gap = rt - rr
        u = torch.where(gap > 1e-9, (y - y_r) / gap.clamp(min=1e-9), rt * (y - self.mu) / (s2 + rt ** 2))
        return (y - rt * u).to(x_t.dtype)


def _meanflow_sq(student, teacher, flow_fraction, jvp="torch", n=64):
    obj = build_objective({"name": "meanflow", "flow_fraction": flow_fraction, "jvp": jvp})
    real = teacher.sample(n, generator=torch.Generator().manual_seed(0)).double()
    b = Batch(x=torch.zeros_like(real), real=real, rng=torch.Generator().manual_seed(2), step=0)
    out = obj.generator_loss(b, Roles(teacher=teacher, student=student, target=copy.deepcopy(student)))
    return float(out["meanflow/sq"]), out


@pytest.mark.parametrize("jvp", ["torch", "fd"])
def test_meanflow_target_is_the_exact_average_velocity(jvp):
    """On a Gaussian teacher the exact flow map satisfies the MeanFlow identity for every (r, t): its loss
    vanishes (r < t, the JVP target; r = t, flow matching), while a flow map of a shifted Gaussian does not."""
    from scoredistill.teachers.gmm import GMMTeacher

    teacher = GMMTeacher([[1.0, -0.5]], 0.3, process=EDM())
    exact, wrong = _GaussFlowMap([1.0, -0.5], 0.3), _GaussFlowMap([1.2, -0.5], 0.3)
    for frac in (0.0, 1.0):
        assert _meanflow_sq(exact, teacher, frac, jvp)[0] < 1e-10, (jvp, frac)  # measured <= 3e-14
        assert _meanflow_sq(wrong, teacher, frac, jvp)[0] > 1e-3, (jvp, frac)  # measured 0.022, 0.043


def test_meanflow_gradient_jvp_equals_finite_difference_on_the_two_time_mlp():
    from scoredistill.teachers.gmm import build_gmm

    teacher = build_gmm({"preset": "ring8"}, EDM())
    grads = []
    for jvp in ("torch", "fd"):
        torch.manual_seed(0)
        student = _perturbed(MLPDenoiser(EDM(), 2, 32, 2, sigma_data=0.5, emb_dim=16, two_time=True))
        _, out = _meanflow_sq(student, teacher, 0.0, jvp)
        out["loss"].backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in student.parameters()]))
    assert _rel(grads[1], grads[0]) < TOL_MEANFLOW


def test_meanflow_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="objective.flow_fraction"):
        build_objective({"name": "meanflow", "flow_fraction": 1.5})
    from scoredistill.teachers.gmm import build_gmm

    one_time = MLPDenoiser(EDM(), 2, 32, 2, sigma_data=0.5, emb_dim=16)
    with pytest.raises(ConfigError, match="generator.kind.*two-time"):
        _meanflow_sq(one_time, build_gmm({"preset": "ring8"}, EDM()), 0.5)
