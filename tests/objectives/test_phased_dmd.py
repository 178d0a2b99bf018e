"""Phased DMD (arXiv 2510.27684; docs/objectives/phased_dmd.md) on exact GMM scores: the sub-interval DSM target
is unbiased for EDM, VP and flow processes, the teacher and the fake are read only above each phase's level, the
last phase is DMD2, every phase's field has the right sign, a step's gradient reaches only its phase's expert
(student and fake), experts survive export and resume, and bad phase settings are one-line errors."""


import pytest
import torch

from helpers import tiny_config
from scoredistill.config import resolve
from scoredistill.engine.distiller import Distiller
from scoredistill.errors import ConfigError
from scoredistill.models.fewstep import PhaseExperts, build_fewstep, fresh_mlp_denoiser, phase_index
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.models.registry import load_model, save_model
from scoredistill.models.rollout import StepOutput
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives.core import dm_field
from scoredistill.objectives.phased_dmd import SubInterval, level_coeffs
from scoredistill.process import EDM, VPDiscrete
from scoredistill.process.processes import RectifiedFlow
from scoredistill.teachers.gmm import GMMTeacher, build_gmm

pytestmark = pytest.mark.usefixtures("one_thread")
PROCESSES = [EDM(), VPDiscrete(), RectifiedFlow()]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _gmm(process):
    return GMMTeacher([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], [0.3, 0.5, 0.2], [0.5, 0.3, 0.2], process=process)


def _level_posterior_mean(gmm, process, t_s, t, x_t):
    """Exact ``E[x_s | x_t]`` for ``x_s ~ p_s`` (the mixture diffused to ``t_s``), ``x_t = alpha x_s + beta n``."""
    a_s, s_s = level_coeffs(process, t_s, x_t)
    sub = SubInterval.of(process, t_s, t, x_t)
    m = a_s[:, :, None] * gmm.means[None]                                   # (B, K, D) component means at s
    c = (a_s * a_s * gmm.stds[None] ** 2 + s_s * s_s)                       # (B, K) isotropic variances at s
    al, be = sub.alpha, sub.beta
    var_t = al * al * c + be * be
    diff = x_t.double()[:, None, :] - al[:, :, None] * m
    logp = gmm.weights.log()[None] - x_t.shape[1] / 2 * var_t.log() - 0.5 * (diff * diff).sum(-1) / var_t
    r = torch.softmax(logp, 1)
    post = m + (al * c / var_t)[:, :, None] * diff
    return (r[:, :, None] * post).sum(1)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_subinterval_target_is_unbiased(process):
    """``D* = (x_t - s_t^2 n / beta) / a_t`` is affine in ``(x_s, n)`` given ``x_t``, so its conditional expectation
    is ``D*`` at ``(E[x_s|x_t], E[n|x_t])``: it must be the teacher's denoiser at ``t`` (``q_s = p_s`` makes
    ``q_t = p_t``), exactly. Plain DSM on ``x_s`` (treating it as clean data) is biased unless ``s_s = 0``."""
    gmm = _gmm(process)
    n = 64
    x_t = torch.randn(n, 2, generator=_g(0), dtype=torch.float64) * 2
    for t_s_val in (0.0, 0.3, 0.6):
        t_s = torch.full((n,), t_s_val, dtype=torch.float64)
        t = t_s + 0.02 + (0.95 - t_s - 0.02) * torch.rand(n, generator=_g(1), dtype=torch.float64)
        sub = SubInterval.of(process, t_s, t, x_t)
        m = _level_posterior_mean(gmm, process, t_s, t, x_t)
        n_bar = (x_t.double() - sub.alpha * m) / sub.beta
        assert torch.allclose(sub.forward(m, n_bar), x_t, atol=1e-9)
        teacher = gmm(x_t, t).double()
        assert torch.allclose(sub.x0_target(x_t, n_bar), teacher, atol=1e-7), (process.name, t_s_val)
        # Tweedie for the sub-interval: the teacher's estimate of x_s from x_t is the exact posterior mean
        assert torch.allclose(sub.level_mean(x_t, teacher), m, atol=1e-7), (process.name, t_s_val)
        if t_s_val > 0:  # the check can fail: x_s taken as clean data is not the score of q_t
            assert (m - teacher).abs().max() > 1e-2, (process.name, t_s_val)
    # the last phase is plain DSM: the target is the clean sample itself
    x0, noise = torch.randn(n, 2, generator=_g(2)), torch.randn(n, 2, generator=_g(3))
    zero, t = torch.zeros(n, dtype=torch.float64), torch.full((n,), 0.5, dtype=torch.float64)
    sub = SubInterval.of(process, zero, t, x0)
    assert torch.allclose(sub.x0_target(sub.forward(x0, noise), noise), x0.double(), atol=1e-5)


def test_subinterval_target_is_unbiased_by_sampling():
    """The same on the sampling path the fake loss uses: ``x_s ~ p_s`` exactly, ``x_t`` from the sub-interval
    forward process; the residual ``D* - D_teacher(x_t)`` is orthogonal to functions of ``x_t`` (1, ``x_t``)
    within 5 standard errors, while ``x_s - D_teacher(x_t)`` (plain DSM on ``x_s``) is not."""
    process = EDM()
    gmm = _gmm(process)
    n = 50_000
    t_s = torch.full((n,), 0.45, dtype=torch.float64)
    t = 0.47 + 0.1 * torch.rand(n, generator=_g(4), dtype=torch.float64)
    a_s, s_s = level_coeffs(process, t_s, torch.zeros(n, 2))
    x_s = (a_s * gmm.sample(n, generator=_g(5)).double() + s_s * torch.randn(n, 2, generator=_g(6),
                                                                               dtype=torch.float64))
    noise = torch.randn(n, 2, generator=_g(7), dtype=torch.float64)
    sub = SubInterval.of(process, t_s, t, x_s)
    x_t = sub.forward(x_s, noise)
    d = gmm(x_t, t).double()
    for resid, unbiased in ((sub.x0_target(x_t, noise) - d, True), (x_s - d, False)):
        z = []
        for h in (torch.ones(n, 1, dtype=torch.float64), x_t / sub.s_t**2):
            prod = resid * h
            z.append(prod.mean(0).abs() / (prod.std(0) / n**0.5))
        z = torch.cat(z)
        assert bool((z < 5).all()) == unbiased, (unbiased, z)


class Recorder(torch.nn.Module):
    """A denoiser that records the inputs and times it is called at."""

    def __init__(self, net):
        super().__init__()
        self.net, self.process, self.seen, self.inputs = net, net.process, [], []

    def forward(self, x_t, t, cond=None):
        self.seen.append(t.detach().clone())
        self.inputs.append(x_t.detach().clone())
        return self.net(x_t, t, cond)

    def guided(self, x_t, t, cond, w, uncond=None):
        return self.forward(x_t, t, cond)


def _experts(process, split, steps=4):
    torch.manual_seed(0)
    nets = [fresh_mlp_denoiser(process, 2, 32, 2) for _ in range(len(split) + 1)]
    return build_fewstep(PhaseExperts(nets, split), steps=steps, mode="ddim").train()


def _step(gen, k, n=64, seed=0):
    gen.set_rollout_step(k)
    so = gen.train_output(torch.randn(n, 2, generator=_g(seed)))
    return Batch(x=so.x0, rng=_g(seed + 1), rollout=so)


@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
@pytest.mark.parametrize("boundaries", [None, [0.5]], ids=["per_step", "two_phases"])
def test_teacher_and_fake_times_lie_strictly_above_each_phase_level(process, boundaries):
    obj = build_objective({"name": "phased_dmd", "boundaries": boundaries})
    gen = _experts(process, obj.phase_split([1.0, 0.75, 0.5, 0.25]))
    split = gen.denoiser.split
    lows, tops = split + [0.0], [1.0] + split
    teacher = Recorder(build_gmm({"preset": "ring8"}, process))
    fake = Recorder(MLPDenoiser(process, 2, 32, 2))
    for k in range(4):
        p = int(phase_index(torch.tensor([gen.t_steps[k]], dtype=torch.float64), split))
        for call in (obj.generator_loss, obj.auxiliary_losses):
            teacher.seen.clear(), fake.seen.clear()
            out = call(_step(gen, k), Roles(teacher=teacher, fake=fake))
            assert torch.isfinite(out["loss"])
            ts = torch.cat(teacher.seen + fake.seen)
            assert len(ts) and ts.min() >= lows[p] + obj.p.margin - 1e-12 and ts.min() > lows[p], (k, ts.min())
            assert ts.max() <= min(tops[p], obj.time.t_max) + 1e-12, (k, ts.max())
            assert ts.max() - ts.min() > 0.5 * (min(tops[p], obj.time.t_max) - lows[p] - obj.p.margin)


def test_last_phase_is_dmd2():
    """In the last phase (and without a rollout) ``x_s`` is the clean output: the injected gradient is DMD2's field
    at the same ``x_t``, and the fake target is the sample itself."""
    process = VPDiscrete()
    teacher, fake = Recorder(build_gmm({"preset": "ring8"}, process)), MLPDenoiser(process, 2, 32, 2)
    torch.nn.init.normal_(fake.net.out.weight, std=0.2)
    obj = build_objective({"name": "phased_dmd"})
    gen = _experts(process, [0.75, 0.5, 0.25])
    for batch in (_step(gen, 3), Batch(x=torch.randn(64, 2, generator=_g(3)), rng=_g(4))):
        x = batch.x.detach().clone().requires_grad_(True)
        batch.x = x
        fake_rec = Recorder(fake)
        out = obj.generator_loss(batch, Roles(teacher=teacher, fake=fake_rec))
        (gx,) = torch.autograd.grad(out["loss"], x)
        g_ref, _ = dm_field(x.detach(), fake_rec.inputs[-1], fake_rec.seen[-1], None, Roles(teacher=teacher, fake=fake),
                            1.0)
        assert torch.allclose(gx * x.numel(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_every_phase_moves_its_output_toward_the_target(process):
    """Sign in every phase: a student whose prediction is the point ``theta`` and whose step input is ``theta``
    noised to ``t_k`` outputs ``x_s = a_s theta + s_s eps``, the point mass at ``theta`` diffused to ``t_s``, so
    its exact fake score is a narrow mixture at ``theta``; the target is narrow at 0. The gradient on ``theta``
    must point away from 0 (descent moves it toward the target) in each phase ``(t_s, t_k]``."""
    th0 = torch.tensor([1.0, -0.5])
    teacher, fake = GMMTeacher([[0.0, 0.0]], 0.05, process=process), GMMTeacher([th0.tolist()], 0.05, process=process)
    obj, n = build_objective({"name": "phased_dmd"}), 256
    for t_k, t_s in ((1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)):
        theta = th0.clone().requires_grad_(True)
        tk, ts = torch.full((n,), t_k, dtype=torch.float64), torch.full((n,), t_s, dtype=torch.float64)
        a, s = process.coeffs(tk, torch.zeros(n, 2))
        x_k = (a * th0 + s * torch.randn(n, 2, generator=_g(0))).float()
        so = StepOutput(theta.expand(n, 2), x_k, tk, ts, 1)
        out = obj.generator_loss(Batch(x=so.x0, rng=_g(1), rollout=so), Roles(teacher=teacher, fake=fake))
        (g,) = torch.autograd.grad(out["loss"], theta)
        assert float(g @ th0 / (g.norm() * th0.norm())) > 0.8, (process.name, t_k, g)


def test_gradient_reaches_only_the_trained_phase_expert():
    process = EDM()
    teacher, fake = build_gmm({"preset": "ring8"}, process), MLPDenoiser(process, 2, 32, 2)
    torch.nn.init.normal_(fake.net.out.weight, std=0.2)
    for boundaries in (None, [0.5]):
        obj = build_objective({"name": "phased_dmd", "boundaries": boundaries})
        gen = _experts(process, obj.phase_split([1.0, 0.75, 0.5, 0.25]))
        for k in range(4):
            gen.zero_grad(set_to_none=True)
            obj.generator_loss(_step(gen, k), Roles(teacher=teacher, fake=fake))["loss"].backward()
            owner = int(phase_index(torch.tensor([gen.t_steps[k]], dtype=torch.float64), gen.denoiser.split))
            for p, net in enumerate(gen.denoiser.nets):
                reached = any(q.grad is not None and bool(q.grad.abs().sum() > 0) for q in net.parameters())
                assert reached == (p == owner), (boundaries, k, p)


SMALL = tiny_config(generator={"steps": 4, "rollout": "ddim"}, objective={"name": "phased_dmd"},
                    train={"steps": 4, "batch_size": 16, "threads": 1, "checkpoint_every": 2},
                    eval={"every": 100, "n_samples": 32})


def test_experts_export_and_resume(tmp_path):
    full = Distiller(resolve(SMALL), str(tmp_path / "full"), log=lambda *a: None)
    assert isinstance(full.generator.denoiser, PhaseExperts) and len(full.generator.denoiser.nets) == 4
    full.run()
    half = Distiller(resolve(SMALL, ["train.steps=2"]), str(tmp_path / "half"), log=lambda *a: None)
    half.run()
    resumed = Distiller(resolve(SMALL), str(tmp_path / "half"), log=lambda *a: None)
    resumed.run(resume=True)
    a, b = full.generator.state_dict(), resumed.generator.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in half.generator.state_dict().items())
    model, _ = load_model(str(tmp_path / "full" / "generator"))
    assert isinstance(model.denoiser, PhaseExperts) and model.denoiser.split == full.generator.denoiser.split
    z = torch.randn(16, 2, generator=_g(0))
    assert torch.equal(model.eval()(z), full.student().eval()(z))
    save_model(model, str(tmp_path / "again"))  # the folder format round-trips
    assert torch.equal(load_model(str(tmp_path / "again"))[0].eval()(z), model(z))


@pytest.mark.parametrize("override,field", [
    ("objective.boundaries=[0.3,0.6]", "objective.boundaries"),     # not decreasing
    ("objective.boundaries=[1.2]", "objective.boundaries"),         # outside the student's range
    ("objective.boundaries=[0.0]", "objective.boundaries"),
    ("objective.boundaries=[0.6,0.55]", "objective.boundaries"),    # a phase without a step
    ("objective.margin=0.3", "objective.margin"),                   # no time left above a level
    ("generator.experts=per_step;objective.boundaries=[0.5]", "generator.experts"),  # 2 phases, 4 experts
    ("generator.rollout=fresh", "generator.rollout"),
    ("generator.steps=null", "generator.steps"),
    ("generator.kind=lora", "generator.kind"),
    ("objective.name=dmd2;generator.experts=per_phase", "generator.experts"),
    ("objective.name=dmd2;generator.rollout=fresh;fake_score.experts=per_phase", "fake_score.experts"),
])
def test_bad_phase_settings_are_one_line(override, field):
    with pytest.raises(ConfigError) as e:
        Distiller(resolve(SMALL, override.split(";")), None)
    assert e.value.field == field, str(e.value)
    assert "\n" not in str(e.value)


def test_fake_experts_follow_the_student_phases():
    """``fake_score.experts: per_phase``: one fake network per phase, and a fake update reaches only the trained
    step's phase."""
    d = Distiller(resolve(SMALL, ["fake_score.experts=per_phase", "objective.boundaries=[0.5]"]), None)
    assert isinstance(d.fake, PhaseExperts) and d.fake.split == d.generator.denoiser.split == [0.5]
    for k in range(4):
        b = _step(d.generator, k, n=16)
        b.x = b.x.detach()
        d.fake.zero_grad(set_to_none=True)
        d.objective.auxiliary_losses(b, d.roles())["loss"].backward()
        reached = [any(q.grad is not None for q in net.parameters()) for net in d.fake.nets]
        assert reached == [k < 2, k >= 2], (k, reached)


def test_per_step_experts_for_any_objective():
    d = Distiller(resolve(SMALL, ["objective.name=dmd2", "generator.rollout=fresh", "generator.experts=per_step"]),
                  None)
    assert d.generator.denoiser.split == d.generator.t_steps[1:]


@pytest.mark.slow
@pytest.mark.long  # ~120 s on a loaded 2-core box, over this test file's suite budget
def test_phased_dmd_4_step_student_covers_every_ring8_mode(tmp_path):
    """ring8, 4-step student with 4 experts (128-wide 3-block MLPs, the settings of
    tests/objectives/test_fewstep_coverage.py), 1000 iterations, 5 fake : 1 generator, one thread. Measured
    2026-12-01 over train.seed 0 / 1 / 2: precision 0.912 / 0.935 / 0.908, 8/8 modes each, weight TV 0.071 / 0.064 /
    0.030, within_std 1.66 / 1.60 / 1.57 (DMD2 4-step at the same settings, seed 0: 0.870, 8/8, TV 0.023,
    within_std 1.67). At 500 iterations seed 0 is at 0.68, so no shorter budget is asserted. Asserted: every mode
    and precision above the lowest seen less 0.07 (the margin of the other few-step coverage tests)."""
    net = {"kind": "mlp", "width": 128, "depth": 3}
    cfg = resolve({"teacher": {"kind": "gmm", "preset": "ring8"}, "generator": {**net, "steps": 4, "rollout": "ddim"},
                   "fake_score": net, "objective": {"name": "phased_dmd"},
                   "train": {"batch_size": 256, "lr": 1e-3, "fake_lr": 1e-3, "betas": [0.0, 0.99], "ema": 0.99,
                             "progress": False, "checkpoint_every": 100000, "threads": 1, "generator_every": 5,
                             "steps": 1000},
                   "eval": {"every": 100000, "n_samples": 2000, "plots": False}})
    res = Distiller(cfg, str(tmp_path / "run"), log=lambda *a: None).run()
    msg = {k: res[k] for k in ("precision", "modes_covered", "weight_tv", "within_std")}
    assert res["non_finite"] == 0 and res["modes_covered"] == res["num_modes"], msg
    assert res["precision"] >= 0.84, msg
