"""The objective contract, checked for every registered objective.

The tests iterate ``OBJECTIVES``: a new objective gets them by registering itself and adding its
recipe (``recipes/toy/<name>.yaml`` for the generator trainer, ``recipes/optimize/<name>.yaml`` for the
parameter optimizer). What each test fixes:

(a) sign: on a narrow target, one gradient step on the samples moves them toward it;
(b) canonical CFG: ``guidance_scale = 1`` is exactly the unguided field;
(c) stop-gradients: the generator loss reaches exactly the networks it declares
    (:meth:`Objective.differentiates_through`) and ``x``; auxiliary losses see a detached ``x``;
(d) running state survives a save -> load (JSON and tensors) and gives the same next step;
(e) declared requirements are enforced before training, with a one-line error naming the field.

Consistency objectives (requirement ``consistency_target``) train the student's denoiser ``f_theta`` on their
own noisy points instead of reading the generator's samples, so for them (a) starts ``f_theta`` at the wrong
place and asks that its loss gradient move it toward the teacher ODE's target, and (b)-(d) take the gradient
with respect to the student's parameters (it must reach them and never the target copy, nor the frozen stage copy
of a ``stage_snapshot`` objective, which (c) reads at a step past every stage switch).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scoredistill.config import load_yaml
from scoredistill.models.denoiser import Denoiser, expand_t
from scoredistill.models.generators import DiscriminatorHead
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import OBJECTIVES, Batch, Roles, build_objective
from scoredistill.objectives.base import REQUIREMENTS
from scoredistill.optimize.schedule import extract_schedules
from scoredistill.process import EDM, VPDiscrete
from scoredistill.teachers.gmm import GMMTeacher, build_gmm

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(OBJECTIVES)
REPO = Path(__file__).resolve().parents[2]
N = 32


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


def recipe_of(name: str) -> tuple[str, Path]:
    """(CLI command, recipe path) of an objective: the folder says which driver runs it."""
    for command, folder in (("distill", "toy"), ("optimize", "optimize")):
        path = REPO / "recipes" / folder / f"{name}.yaml"
        if path.exists():
            return command, path
    raise AssertionError(f"objective {name} has no recipe in recipes/toy or recipes/optimize")


class FeatureGMM(GMMTeacher):
    """Exact-score Gaussian mixture that also exposes ``features`` (the noisy input) for a head."""

    def features(self, x_t, t, cond=None):
        return x_t.float()


def _batch(x, cond, teacher, seed=0, step=0, **extra):
    n = x.shape[0]
    ode_cond = None if cond is None else cond.clone()
    return Batch(x=x, cond=cond, z=torch.zeros(n, x.shape[1]), real=teacher.sample(n, generator=_rng(1)),
                 real_cond=cond, ode_z=torch.zeros(n, x.shape[1]), ode_x=torch.zeros(n, x.shape[1]),
                 ode_cond=ode_cond, rng=_rng(seed), step=step, **extra)


def _consistency(obj) -> bool:
    return "consistency_target" in obj.requirements()


def _two_time(obj) -> bool:
    return "two_time_student" in obj.requirements()


def _signed_time(obj) -> bool:
    return "signed_time_student" in obj.requirements()


class ConstRaw(Denoiser):
    """EDM-preconditioned denoiser whose raw network output is a learned constant: in VE coordinates
    ``y = x_t/a_t``, ``D = c_skip(rho) y + c_out(rho) theta`` (arXiv 2206.00364): ``D -> x_t`` as ``rho -> 0``
    (the consistency boundary) and ``D -> sd theta`` at large noise."""

    def __init__(self, process, theta, sd=0.5):
        super().__init__()
        self.process, self.data_shape, self.sigma_data = process, (len(theta),), sd
        self.theta = torch.nn.Parameter(torch.as_tensor(theta, dtype=torch.float32).clone())

    two_time = True  # its output ignores a jump's end time r: a valid (r-independent) two-time network
    signed_time = True  # and the sign of t: a signed-time network whose twin branch equals the real one

    def denoise(self, x_t, t, cond=None, r=None):
        t = expand_t(t, x_t.shape[0], x_t.device).abs()
        rho, a = self.process.rho(t)[:, None], self.process.alpha(t)[:, None]
        sd = self.sigma_data
        c_skip, c_out = sd * sd / (rho * rho + sd * sd), rho * sd / (rho * rho + sd * sd).sqrt()
        return (c_skip * x_t.double() / a + c_out * self.theta.double()).to(x_t.dtype)


def _student_roles(roles, obj):
    """``roles`` with a student denoiser of random outputs and its target copy (the engine's
    ``consistency_target``), two-time / signed-time for objectives that require a ``two_time_student`` /
    ``signed_time_student`` (the engine builds it so), and a frozen stage copy for ``stage_snapshot``. The
    copies require grad here, so a gradient leaking into them is seen."""
    torch.manual_seed(1)
    student = MLPDenoiser(roles.teacher.process, 2, 32, 2, num_classes=4, sigma_data=0.5, two_time=_two_time(obj),
                          signed_time=_signed_time(obj))
    if _signed_time(obj):  # a twin branch that differs from the real one, so a gradient through it is seen
        torch.nn.init.normal_(student.twin_mlp[2].weight, std=0.2)
    torch.nn.init.normal_(student.net.out.weight, std=0.2)
    roles = copy.copy(roles)
    roles.student, roles.target = student, copy.deepcopy(student)
    if "stage_snapshot" in obj.requirements():
        roles.snapshot = _perturbed_copy(student)
    return roles


def _perturbed_copy(net):
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_rng(11)))
    return other


def test_every_objective_has_a_recipe_and_known_requirements():
    for name in NAMES:
        recipe_of(name)
        assert OBJECTIVES[name].name == name
        assert build_objective({"name": name}).requirements() <= set(REQUIREMENTS), name


# -- (a) sign on a narrow target -------------------------------------------------------------------------
# Samples sit at theta (a point-mass generator); the target is N(0, 0.05^2 I). A fake score is the
# exact score of the samples (the same narrow Gaussian at theta); objectives with a regression term get
# the teacher's ODE output 0 as their pair. A class-conditional objective sees class 1 = the target
# and class 0 = a distractor beyond theta, with every sample labelled 1.
THETA = (1.0, -0.5)
STD = 0.05
# TSM's interval target reverses its sign at t > ~0.9 on a narrow VP target (measured: t = 0.90 and
# 0.95 push away, t <= 0.64 pulls toward it); the warm-up time range reaches 0.98 at step 0.
KNOWN_SIGN = {("tsm", "vp"): "TSM field points away from a narrow VP target at large t"}


@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
@pytest.mark.parametrize("name", NAMES)
def test_a_one_step_moves_samples_toward_a_narrow_target(name, process, request):
    if (name, process.name) in KNOWN_SIGN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_SIGN[(name, process.name)], strict=True))
    obj = build_objective({"name": name})
    theta0 = torch.tensor(THETA)
    if _consistency(obj):
        return _consistency_sign(obj, process)
    if "class_conditional" in obj.requirements():
        teacher = GMMTeacher([[0.0, 0.0], (3 * theta0).tolist()], STD, classes=[1, 0], process=process)
        cond = torch.ones(256, dtype=torch.long)
    else:
        teacher, cond = GMMTeacher([[0.0, 0.0]], STD, process=process), None
    fake = FeatureGMM([THETA], STD, process=process)
    torch.manual_seed(0)
    head = DiscriminatorHead(2, 16)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    theta = theta0.clone().requires_grad_(True)
    gen = lambda z, c: theta.expand(len(z), 2)  # noqa: E731
    out = obj.generator_loss(_batch(theta.expand(256, 2), cond, teacher),
                             Roles(teacher=teacher, fake=fake, discriminator=head, generator=gen))
    (grad,) = torch.autograd.grad(out["loss"], theta)
    # gradient descent decreases |theta - 0| iff the gradient has a positive component along theta
    cos = float(grad @ theta0 / (grad.norm() * theta0.norm()))
    assert cos > 0.8, (name, grad, cos)


def _consistency_sign(obj, process):
    """The student starts at ``f = D_0`` with raw output 0 (every noisy point maps toward the origin at large
    noise); the target is a narrow Gaussian at THETA, whose ODE map sends every point near THETA. One
    gradient-descent step must move the raw output toward THETA / sd (what makes f ~ THETA at large noise)."""
    theta0 = torch.tensor(THETA)
    teacher = GMMTeacher([THETA], STD, process=process)
    student = ConstRaw(process, [0.0, 0.0])
    target = copy.deepcopy(student).requires_grad_(False)
    b = _batch(torch.zeros(256, 2), None, teacher)
    b.real_cond = None
    fake = FeatureGMM([THETA], STD, process=process)  # rCM's DMD term: exact fake score at the (detached) samples
    out = obj.generator_loss(b, Roles(teacher=teacher, fake=fake, student=student, target=target))
    (grad,) = torch.autograd.grad(out["loss"], student.theta)
    cos = float(-grad @ theta0 / (grad.norm() * theta0.norm()))
    assert cos > 0.8, (obj.name, grad, cos)


# -- shared set-up for (b)-(d): a class-conditional ring teacher, MLP networks with random outputs --------
def _networks(process, teacher_mlp=False):
    torch.manual_seed(0)
    teacher = build_gmm({"preset": "ring8_cond"}, process)
    if teacher_mlp:  # a teacher with parameters, for the gradient-placement checks
        teacher = MLPDenoiser(process, 2, 32, 2, num_classes=4)
        torch.nn.init.normal_(teacher.net.out.weight, std=0.2)
    fake = MLPDenoiser(process, 2, 32, 2, num_classes=4)
    torch.nn.init.normal_(fake.net.out.weight, std=0.2)
    head = DiscriminatorHead(32, 16)
    gen_w = torch.nn.Parameter(torch.eye(2) * 1.5)
    gen = lambda z, c: z @ gen_w + 0.3 * c[:, None].float()  # noqa: E731  (label-dependent generator)
    return teacher, fake, head, gen


REF = build_gmm({"preset": "ring8_cond"}, VPDiscrete())  # the real samples of objectives that read them


def _inputs(seed=0):
    g = _rng(100 + seed)
    x = torch.randn(N, 2, generator=g) * 1.5
    cond = torch.arange(N) % 4
    return x, cond


def _run(obj, roles, x, cond, seed=3, step=10):
    """Loss and gradient w.r.t. ``x`` of one generator call (per-item fields for the optimizer's objectives;
    w.r.t. the student's parameters for consistency objectives)."""
    xx = x.clone().requires_grad_(True)
    extra = {"view": torch.arange(N) % 8, "index": torch.arange(N), "num_items": N}
    b = _batch(xx, cond, REF, seed, step, **extra)
    b.z = torch.randn(N, 2, generator=_rng(7))
    if _consistency(obj):
        roles = _student_roles(roles, obj)
        out = obj.generator_loss(b, roles)
        grads = torch.autograd.grad(out["loss"], list(roles.student.parameters()))
        return out["loss"].detach(), torch.cat([g.reshape(-1) for g in grads])
    out = obj.generator_loss(b, roles)
    (gx,) = torch.autograd.grad(out["loss"], xx)
    return out["loss"].detach(), gx




# -- (b) guidance_scale = 1 is the unguided field --------------------------------------------------------
def _plain(net: Denoiser, seen: list | None = None) -> Denoiser:
    """A copy whose ``guided`` is the plain conditional call (records the scales it is asked for)."""
    other = copy.deepcopy(net)

    def guided(x_t, t, cond, w, uncond=None):
        if seen is not None:
            seen.append(float(w))
        return other.denoise(x_t, t, cond)

    other.guided = guided
    return other


@pytest.mark.parametrize("name", NAMES)
def test_b_guidance_one_is_the_unguided_field(name):
    proc = VPDiscrete()
    teacher, fake, head, gen = _networks(proc)
    x, cond = _inputs()
    roles = Roles(teacher=teacher, fake=fake, discriminator=head, generator=gen)
    plain = Roles(teacher=_plain(teacher), fake=_plain(fake), discriminator=head, generator=gen)
    loss1, g1 = _run(build_objective({"name": name, "guidance_scale": 1.0}), roles, x, cond)
    loss_u, g_u = _run(build_objective({"name": name, "guidance_scale": 1.0}), plain, x, cond)
    assert torch.equal(loss1, loss_u) and torch.equal(g1, g_u), (name, (g1 - g_u).abs().max())
    # the check can fail: where the scale reaches a guided call, w = 3 changes the field
    seen: list[float] = []
    rec = Roles(teacher=_plain(teacher, seen), fake=_plain(fake, seen), discriminator=head, generator=gen)
    _run(build_objective({"name": name, "guidance_scale": 3.0}), rec, x, cond)
    if any(w != 1.0 for w in seen):
        _, g3 = _run(build_objective({"name": name, "guidance_scale": 3.0}), roles, x, cond)
        assert (g3 - g1).abs().max() > 1e-6 * g1.abs().max(), name


# -- (c) stop-gradient placement -------------------------------------------------------------------------
def _reached(loss, params) -> bool:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_c_gradients_reach_x_and_only_the_declared_networks(name):
    proc = VPDiscrete()
    teacher, fake, head, gen = _networks(proc, teacher_mlp=True)
    x, cond = _inputs()
    obj = build_objective({"name": name, "guidance_scale": 2.0})
    roles = Roles(teacher=teacher, fake=fake, discriminator=head, generator=gen)
    xx = x.clone().requires_grad_(True)
    extra = {"view": torch.arange(N) % 8, "index": torch.arange(N), "num_items": N}
    if _consistency(obj):  # past every warm-up (rCM's pure-sCM phase)
        extra["step"] = 10**6
    if _consistency(obj):  # the student's denoiser is trained; its target (and stage) copies are never reached
        roles = _student_roles(roles, obj)
    out = obj.generator_loss(_batch(xx, cond, REF, **extra), roles)
    declared = obj.differentiates_through()
    assert declared <= {"teacher", "fake", "discriminator"}, declared
    for role, net in (("teacher", teacher), ("fake", fake), ("discriminator", head)):
        assert _reached(out["loss"], list(net.parameters())) == (role in declared), (name, role, declared)
    if _consistency(obj):
        assert _reached(out["loss"], list(roles.student.parameters())), name
        assert not _reached(out["loss"], list(roles.target.parameters())), name
        if roles.snapshot is not None:
            assert not _reached(out["loss"], list(roles.snapshot.parameters())), name
        # a term on the generator's samples (rCM's DMD) reaches x; pure consistency losses never read x
        assert _reached(out["loss"], [xx]) == obj.uses_generator_samples, name
    if not _consistency(obj) or obj.uses_generator_samples:
        (gx,) = torch.autograd.grad(out["loss"], xx, retain_graph=True)
        assert torch.isfinite(gx).all() and gx.abs().max() > 0, name
    # auxiliary phase: x is detached, the teacher is never trained, the declared auxiliary roles are
    xa = x.clone().requires_grad_(True)
    aux = obj.auxiliary_losses(_batch(xa, cond, REF, seed=5, **extra), roles)
    req = obj.requirements()
    if aux is None:
        assert not req & {"fake_score", "discriminator"}, f"{name} declares {req} but trains no auxiliary role"
    else:
        (g_aux,) = torch.autograd.grad(aux["loss"], xa, allow_unused=True, retain_graph=True)
        assert g_aux is None, f"{name}: an auxiliary loss must see detached samples"
        assert not _reached(aux["loss"], list(teacher.parameters())), name
        assert _reached(aux["loss"], list(fake.parameters())) == ("fake_score" in req), name
        assert _reached(aux["loss"], list(head.parameters())) == ("discriminator" in req), name
    if _consistency(obj) and not obj.uses_generator_samples:
        return
    # with the networks frozen, as the engine runs the generator phase, x gets the same gradient
    for net in (teacher, fake, head):
        net.requires_grad_(False)
    xx2 = x.clone().requires_grad_(True)
    out2 = obj.generator_loss(_batch(xx2, cond, REF, **extra), roles)
    (gx2,) = torch.autograd.grad(out2["loss"], xx2)
    assert torch.allclose(gx2, gx, rtol=1e-5, atol=1e-8), name


# -- (d) running state round-trip ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_d_state_survives_save_and_load(name, tmp_path):
    proc = VPDiscrete()
    teacher, fake, head, gen = _networks(proc)
    roles = Roles(teacher=teacher, fake=fake, discriminator=head, generator=gen)
    x, cond = _inputs()
    cfg = {"name": name}
    a = build_objective(cfg)
    for seed in (0, 1):  # build up state (f-distill's ratio bins, CDS's fixed noise)
        _run(a, roles, x, cond, seed=seed)
    state = json.loads(json.dumps(a.state_dict()))
    tensors = a.state_tensors()
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
        tensors = load_file(str(tmp_path / "state.safetensors"))
    b = build_objective(cfg)
    if state or tensors:  # the restore is observable: a fresh objective does not start in this state
        assert b.state_dict() != a.state_dict() or set(b.state_tensors()) != set(a.state_tensors()), name
    b.load_state_dict(state)
    b.load_state_tensors(tensors)
    assert b.state_dict() == a.state_dict(), name
    assert set(b.state_tensors()) == set(a.state_tensors())
    assert all(torch.equal(b.state_tensors()[k], v) for k, v in a.state_tensors().items())
    la, ga = _run(a, roles, x, cond, seed=2)
    lb, gb = _run(b, roles, x, cond, seed=2)
    assert torch.equal(la, lb) and torch.equal(ga, gb), name
    assert b.state_dict() == a.state_dict()


# -- (e) declared requirements are enforced before training -----------------------------------------------
# how a config leaves out what a requirement asks for, and the fields its error may name
REMOVALS = {
    "class_conditional": ("teacher.preset=ring8", ("teacher", "params.classes")),
    "real_data": ("train.real_data=none", ("train.real_data",)),
}


def _requirement_cases():
    cases = []
    for name in NAMES:
        command, recipe = recipe_of(name)
        section = load_yaml(str(recipe))["objective"]
        if command == "optimize":  # the optimizer's recipes may schedule parameters
            section, _ = extract_schedules(section, "objective")
        for req in sorted(build_objective(section).requirements() & set(REMOVALS)):
            cases.append((name, req))
    return cases


@pytest.mark.parametrize("name,requirement", _requirement_cases())
def test_e_missing_requirement_is_a_one_line_config_error(name, requirement, tmp_path, capsys):
    from scoredistill.cli.main import main

    command, recipe = recipe_of(name)
    override, fields = REMOVALS[requirement]
    small = ["--set", "eval.n_samples=64"] if command == "distill" else []
    with pytest.raises(SystemExit) as e:
        main([command, str(recipe), "--out", str(tmp_path / "r"), "--set", override, "--set", "train.steps=1",
              "--set", "train.progress=false", "--set", "eval.plots=false", *small])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and any(f"{field}: " in err[0] for field in fields), err
    run = tmp_path / "r"  # raised while the driver is built, before the run writes anything (config, logs)
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())


def test_e_every_requirement_kind_is_exercised():
    """The cases above are not vacuous: the registered objectives declare each removable requirement."""
    assert {req for _, req in _requirement_cases()} == set(REMOVALS)
