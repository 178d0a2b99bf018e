"""TDM (arXiv 2503.06674; docs/objectives/tdm.md) on exact GMM scores: the two-stage interval perturbation,
scoring only inside the trained step's interval, the element-wise pseudo-Huber gradient against an
independent DMD2 field, the step-aware fake loss, and the engine's refusal of students TDM cannot train."""

import pytest
import torch

from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.errors import ConfigError
from scoredistill.models.fewstep import build_fewstep, fresh_mlp_denoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives.core import dm_field, inject
from scoredistill.objectives.tdm import importance_weight, two_stage
from scoredistill.process import EDM, VPDiscrete
from scoredistill.teachers.gmm import GMMTeacher, build_gmm

pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_two_stage_perturbation_is_a_marginal_forward_noising(process):
    n = 64
    x0, eps, xi = (torch.randn(n, 3, generator=_g(s), dtype=torch.float64) for s in (0, 1, 2))
    t_mid = 0.1 + 0.4 * torch.rand(n, generator=_g(3), dtype=torch.float64)
    t = t_mid + (0.9 - t_mid) * torch.rand(n, generator=_g(4), dtype=torch.float64)
    p = two_stage(process, x0, eps, t_mid, t, xi)
    a_m, s_m = process.coeffs(t_mid, x0)
    a_t, s_t = process.coeffs(t, x0)
    # x_t = a_t x0 + s_t m exactly, and m's two coefficients have unit norm: a unit-variance noise
    assert torch.allclose(p.x_t, a_t * x0 + s_t * p.mixed, atol=1e-12)
    beta2 = s_t**2 - (a_t / a_m * s_m) ** 2
    assert (beta2 > 0).all()
    assert torch.allclose(((a_t / a_m * s_m) ** 2 + beta2) / s_t**2, torch.ones_like(s_t), atol=1e-12)
    # t = t_mid: no fresh noise enters, the sample is the deterministic re-noise with eps
    q = two_stage(process, x0, eps, t_mid, t_mid.clone(), xi)
    assert torch.allclose(q.mixed, eps, atol=1e-12) and torch.allclose(q.x_t, a_m * x0 + s_m * eps, atol=1e-12)
    # the importance weight: 1 where the mixed noise is as likely as the fresh one, < 1 where it is less likely
    assert torch.allclose(importance_weight(q), torch.exp(-0.5 * ((eps**2).mean(1) - (xi**2).mean(1))))
    less_likely = (eps**2).mean(1) > (xi**2).mean(1)
    assert less_likely.any() and (~less_likely).any()
    assert torch.equal(importance_weight(q) < 1, less_likely)


def _student(process, mode="ddim"):
    torch.manual_seed(0)
    return build_fewstep(fresh_mlp_denoiser(process, 2, 32, 2), steps=4, mode=mode).train()


@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_scoring_times_lie_inside_the_trained_steps_interval(process):
    obj = build_objective({"name": "tdm"})
    gen = _student(process)
    times = gen.t_steps + [0.0]
    for k in range(4):
        gen.set_rollout_step(k)
        with torch.no_grad():
            so = gen.train_output(torch.randn(256, 2, generator=_g(k)))
        p = obj.perturb(Batch(x=so.x0, rollout=so, rng=_g(10 + k)), process)
        t_k, t_next = times[k], times[k + 1]
        assert torch.equal(p.t_mid, torch.full_like(p.t_mid, max(t_next, process.t_min)))
        assert (p.t >= max(t_next, 0.02) - 1e-12).all() and (p.t <= t_k - 0.01 + 1e-12).all(), (k, p.t.min(), p.t.max())
        assert float(p.t.max() - p.t.min()) > 0.5 * (t_k - 0.01 - max(t_next, 0.02))  # spread over the interval
        # the first stage uses the student's own eps: at t = t_mid the sample is x0_k re-noised with it
        a, s = process.coeffs(p.t_mid, so.x0)
        eps = so.eps(process)
        q = two_stage(process, so.x0, eps, p.t_mid, p.t_mid, p.xi)
        assert torch.allclose(q.x_t.double(), a * so.x0.double() + s * eps.double(), atol=1e-5)


def _exact_roles(process):
    teacher = build_gmm({"preset": "ring8"}, process)
    fake = GMMTeacher([[0.5, 0.5], [-1.0, 0.2]], 0.4, weights=[0.7, 0.3], process=process)  # a wrong "sample" score
    return Roles(teacher=teacher, fake=fake)


@pytest.mark.parametrize("c", [1e-3, 0.5, 0.0])
def test_generator_gradient_is_the_elementwise_pseudo_huber_of_the_dmd2_field(c):
    """Independent check: the DMD2 field (core.dm_field) at TDM's own x_t and t, pushed through d/dr of
    sqrt(r^2 + c^2) (c = 0: r^2) and divided by numel, is the gradient TDM's loss gives x."""
    process = EDM()
    roles = _exact_roles(process)
    obj = build_objective({"name": "tdm", "huber_c": c})
    gen = _student(process)
    gen.set_rollout_step(1)
    so = gen.train_output(torch.randn(128, 2, generator=_g(0)))
    x = so.x0.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(obj.generator_loss(Batch(x=x, rollout=so, rng=_g(5)), roles)["loss"], x)
    p = obj.perturb(Batch(x=x.detach(), rollout=so, rng=_g(5)), process)  # the same draws
    g, norm = dm_field(x.detach(), p.x_t, p.t, None, roles, 1.0)  # (D_fake - D_real) / omega
    delta = g.double() * norm.double()
    d_el = delta / torch.sqrt(delta**2 + c * c) if c > 0 else 2 * delta
    expect = d_el / norm.double() / x.numel()
    assert torch.allclose(gx.double(), expect, rtol=1e-4, atol=1e-9), (gx - expect).abs().max()
    if c == 0.0:  # the MSE variant is twice DMD2's mean-injected field at the same x_t
        xx = x.detach().clone().requires_grad_(True)
        (g2,) = torch.autograd.grad(inject(xx, g), xx)
        assert torch.allclose(gx, 2 * g2, rtol=1e-4, atol=1e-9)
    # an exact fake score of the teacher is a fixed point: no gradient at all
    same = Roles(teacher=roles.teacher, fake=roles.teacher)
    (g0,) = torch.autograd.grad(obj.generator_loss(Batch(x=x, rollout=so, rng=_g(5)), same)["loss"], x)
    assert float(g0.abs().max()) == 0.0


def test_fake_loss_is_snr_capped_and_importance_weighted():
    process = EDM()
    roles = _exact_roles(process)
    obj = build_objective({"name": "tdm", "snr_cap": 5.0})
    gen = _student(process)
    gen.set_rollout_step(2)  # EDM, t in [0.25, 0.49]: noise levels 0.17 .. 2.3, SNR on both sides of the cap
    with torch.no_grad():
        so = gen.train_output(torch.randn(256, 2, generator=_g(1)))
    out = obj.auxiliary_losses(Batch(x=so.x0, rollout=so, rng=_g(7)), roles)
    p = obj.perturb(Batch(x=so.x0, rollout=so, rng=_g(7)), process)
    a, s = process.coeffs(p.t, so.x0)
    snr = (a / s).reshape(-1) ** 2
    assert (snr > 5).any() and (snr < 5).any()
    err = ((roles.fake(p.x_t, p.t) - so.x0) ** 2).double().mean(1)
    expect = (err * snr.clamp(max=5.0) * importance_weight(p)).mean()
    assert torch.allclose(out["loss"].double(), expect, rtol=1e-5)
    iw = importance_weight(p)
    assert float(iw.min()) < 0.9 < 1.1 < float(iw.max())  # the weight is not a constant


CFG = {"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {"width": 16, "depth": 1},
       "fake_score": {"width": 16, "depth": 1}, "objective": {"name": "tdm"},
       "train": {"steps": 2, "batch_size": 16, "progress": False}, "eval": {"n_samples": 16, "plots": False}}


@pytest.mark.parametrize("gen,field", [({}, "generator.steps"), ({"steps": 4}, "generator.rollout"),
                                       ({"steps": 4, "rollout": "fixed"}, "generator.rollout")])
def test_students_tdm_cannot_train_are_refused(tmp_path, gen, field):
    cfg = resolve({**CFG, "generator": {**CFG["generator"], **gen}})
    with pytest.raises(ConfigError) as e:
        Distiller(cfg, str(tmp_path / "run"), log=lambda *a: None)
    assert e.value.field == field, str(e.value)


def test_engine_passes_the_trained_step(tmp_path):
    """Two iterations through the engine: the objective sees the step the student trained (x == its x0)."""
    cfg = resolve({**CFG, "generator": {**CFG["generator"], "steps": 4, "rollout": "ddim"}})
    d = Distiller(cfg, str(tmp_path / "run"), log=lambda *a: None)
    seen = []
    orig = d.objective.generator_loss

    def spy(batch, roles):
        seen.append((batch.rollout.step, torch.equal(batch.x, batch.rollout.x0.float())))
        return orig(batch, roles)

    d.objective.generator_loss = spy
    d.train_step()
    d.train_step()
    assert len(seen) == 2 and all(same for _, same in seen)
    assert [k for k, _ in seen] == [d.generator.rollout.choose_step(hash((0, i, -1)) & (2**62 - 1)) for i in range(2)]
