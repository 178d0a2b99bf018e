"""DMD, DMD2 and VSD specifics: the normalised field and its injection, the DMD variants' sign, the GAN
term, the CFG convention, parameter errors. The shared contract is in test_contract.py."""

import pytest
import torch

from scoredistill.config import ConfigError
from scoredistill.models.generators import DiscriminatorHead
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives.core import WEIGHTINGS, dm_field, eps_weight, inject, score_field, to_eps, x0_weight
from scoredistill.process import EDM, VPDiscrete
from scoredistill.teachers.gmm import GMMTeacher, build_gmm


@pytest.mark.parametrize("cfg", [{"name": "dmd", "regression_weight": 0.0}, {"name": "dmd2", "alpha_factor": True},
                                 {"name": "vsd", "weighting": "uniform"}, {"name": "vsd", "weighting": "x0"}], ids=str)
@pytest.mark.parametrize("process", [EDM(), VPDiscrete()], ids=lambda p: p.name)
def test_variant_moves_point_mass_toward_target(cfg, process):
    """Variants the contract suite (defaults only) does not cover: the field without regression, with
    DMD's a_t factor, VSD's other weightings. Target at 0, samples at theta with their exact fake score."""
    obj = build_objective(cfg)
    theta = torch.tensor([1.0, -0.5], requires_grad=True)
    teacher = GMMTeacher([[0.0, 0.0]], 0.05, process=process)
    fake = GMMTeacher([[1.0, -0.5]], 0.05, process=process)
    out = obj.generator_loss(Batch(x=theta.expand(64, 2), rng=torch.Generator().manual_seed(0)),
                             Roles(teacher=teacher, fake=fake))
    (grad,) = torch.autograd.grad(out["loss"], theta)
    cos = float(grad @ theta.detach() / (grad.norm() * theta.detach().norm()))
    assert cos > 0.99, (grad, cos)


def test_dmd_gradient_is_normalised_field_over_numel():
    proc = EDM()
    teacher = build_gmm({"preset": "ring8"}, proc)
    fake = GMMTeacher(torch.zeros(1, 2), 1.0, process=proc)
    obj = build_objective({"name": "dmd2"})
    x = torch.randn(32, 2, requires_grad=True)
    out = obj.generator_loss(Batch(x=x, rng=torch.Generator().manual_seed(5)), Roles(teacher=teacher, fake=fake))
    (gx,) = torch.autograd.grad(out["loss"], x)
    # recompute the field with the same random stream
    rng = torch.Generator().manual_seed(5)
    t = obj.time(32, proc, generator=rng)
    noise = torch.randn(x.shape, generator=rng)
    x_t = proc.add_noise(x.detach(), noise, t)
    g, norm = dm_field(x.detach(), x_t, t, None, Roles(teacher=teacher, fake=fake), 1.0)
    assert torch.allclose(gx, g / x.numel(), atol=1e-7)
    expected = (fake(x_t, t) - teacher(x_t, t)) / (x.detach() - teacher(x_t, t)).abs().mean(1, keepdim=True)
    assert torch.allclose(g, expected, atol=1e-5)


def test_inject_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    (gx,) = torch.autograd.grad(inject(x, g, "sum_per_sample"), x)
    assert torch.allclose(gx, g / 4)
    (gx,) = torch.autograd.grad(inject(x, g, "mean"), x)
    assert torch.allclose(gx, g / 12)


def test_weighting_table_is_one_weight_in_two_units():
    """``w_x0 = w_eps a_t / s_t`` for every row, and the score-difference field is the same vector in
    epsilon units (``eps_real - eps_fake``) and x0 units (``D_fake - D_real``)."""
    proc = VPDiscrete()
    g = torch.Generator().manual_seed(0)
    t = 0.02 + 0.96 * torch.rand(16, generator=g, dtype=torch.float64)
    x_t, d_real, d_fake = (torch.randn(16, 3, generator=g) for _ in range(3))
    a, s = proc.coeffs(t, x_t)
    for kind in WEIGHTINGS:
        assert torch.allclose(x0_weight(kind, a, s), eps_weight(kind, a, s) * a / s, rtol=1e-12), kind
        g_x0 = score_field(kind, a, s, d_real, d_fake, "x0")
        g_eps = score_field(kind, a, s, to_eps(proc, x_t, d_real, t), to_eps(proc, x_t, d_fake, t), "eps")
        assert torch.allclose(g_x0, g_eps, rtol=1e-6, atol=1e-9), kind


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_vsd_and_vsd_particles_share_their_field(weighting):
    """The generator's ``vsd`` (x0 units, mean reduction) and the optimizer's ``vsd_particles`` (epsilon
    units, sum / B) inject the same field for the same draws."""
    proc = VPDiscrete()
    teacher = build_gmm({"preset": "ring8_cond"}, proc)
    fake = GMMTeacher(teacher.means * 0.7, 0.6, classes=[0, 1, 2, 3, 0, 1, 2, 3], process=proc)
    x0, cond = torch.randn(32, 2), torch.arange(32) % 4
    grads = {}
    for name in ("vsd", "vsd_particles"):
        obj = build_objective({"name": name, "guidance_scale": 2.0, "weighting": weighting})
        x = x0.clone().requires_grad_(True)
        out = obj.generator_loss(Batch(x=x, cond=cond, rng=torch.Generator().manual_seed(4)),
                                 Roles(teacher=teacher, fake=fake))
        grads[name] = torch.autograd.grad(out["loss"], x)[0]
    torch.testing.assert_close(grads["vsd"] * x0.numel(), grads["vsd_particles"] * x0.shape[0], rtol=1e-4, atol=1e-6)


def test_cond_plus_convention_converted_at_load():
    obj = build_objective({"name": "dmd2", "guidance_scale": 3.0}, guidance_convention="cond_plus")
    assert obj.p.guidance_scale == 4.0


def test_dmd2_gan_term_flows_through_frozen_fake():
    proc = EDM()
    teacher = build_gmm({"preset": "ring8"}, proc)
    fake = MLPDenoiser(proc, 2, 32, 2)
    head = DiscriminatorHead(32)
    fake.requires_grad_(False)
    head.requires_grad_(False)
    x0 = torch.randn(16, 2)
    real = teacher.sample(16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for wg in (0.0, 1.0):
        obj = build_objective({"name": "dmd2", "gan_weight_gen": wg})
        x = x0.clone().requires_grad_(True)
        out = obj.generator_loss(Batch(x=x, real=real, rng=torch.Generator().manual_seed(0)),
                                 Roles(teacher=teacher, fake=fake, discriminator=head))
        grads[wg] = torch.autograd.grad(out["loss"], x)[0]
        if wg:
            assert "loss_gan_gen" in out
            assert obj.requirements() == {"fake_score", "discriminator", "real_data"}
    assert not torch.allclose(grads[0.0], grads[1.0])


@pytest.mark.parametrize("name", ["dmd", "dmd2", "sid"])
def test_regression_warm_up_adds_the_ode_pair_loss_before_regression_steps_only(name):
    """``regression_steps: N``: the generator loss is DM + lambda_reg ||G(z_ref) - y_ref||^2 while the engine
    iteration is below N, the DM term alone from N on; ``regression_steps: 0`` keeps the regression always."""
    proc = EDM()
    teacher = build_gmm({"preset": "ring8"}, proc)
    fake = GMMTeacher(torch.zeros(1, 2), 1.0, process=proc)
    lin = torch.nn.Linear(2, 2)

    def gen(z, cond=None):
        return lin(z)

    z, y = torch.randn(8, 2), torch.randn(8, 2)
    reg = float(((gen(z) - y) ** 2).mean().detach())
    x = torch.randn(16, 2)

    def loss(cfg, step):
        obj = build_objective({"name": name, "regression_weight": 0.5, **cfg})
        b = Batch(x=x, rng=torch.Generator().manual_seed(3), step=step, ode_z=z, ode_x=y)
        return obj, obj.generator_loss(b, Roles(teacher=teacher, fake=fake, generator=gen))

    obj, before = loss({"regression_steps": 10}, 9)
    assert "ode_pairs" in obj.requirements()
    _, after = loss({"regression_steps": 10}, 10)
    _, always = loss({}, 10**6)
    value = {k: float(v["loss"].detach()) for k, v in (("before", before), ("after", after), ("always", always))}
    assert value["before"] == pytest.approx(value["after"] + 0.5 * reg, rel=1e-6)
    assert "loss_reg" in before and "loss_reg" not in after
    assert value["always"] == pytest.approx(value["before"], rel=1e-6)
    if name != "dmd":  # off by default: the published methods have no regression
        assert "ode_pairs" not in build_objective({"name": name}).requirements()


@pytest.mark.parametrize("cfg,field", [
    ({"name": "dmd3"}, "objective.name"),
    ({"name": "sfd", "regression_weight": 1}, "objective.regression_weight"),
    ({"name": "dmd2", "regresion_weight": 1}, "objective.regresion_weight"),
    ({"name": "vsd", "weighting": "snr"}, "objective.weighting"),
    ({"name": "dmd2", "guidance_scale": "high"}, "objective.guidance_scale"),
    ({"name": "dmd2", "time": {"kind": "beta"}}, "objective.time.kind"),
])
def test_bad_objective_config(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_objective(cfg)
    assert e.value.field == field
