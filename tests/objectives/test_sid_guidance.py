"""SiD^2's Zero-CFG and Anti-CFG (arXiv 2505.12674; docs/objectives/sid.md): conventions and signs on exact
class-conditional GMM scores."""

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import NULL_CLASS
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives.sid import sid_elementwise
from scoredistill.process import EDM
from scoredistill.teachers.gmm import GMMTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

N = 256


class Recording(GMMTeacher):
    """An exact GMM score that records the labels it is called with."""

    def denoise(self, x_t, t, cond=None):
        self.seen.append(None if cond is None else cond.clone())
        return super().denoise(x_t, t, cond)


def _setup():
    p = EDM()
    teacher = GMMTeacher([[-2.0, 0.0], [2.0, 0.0]], 0.3, classes=[0, 1], process=p)
    fake = Recording([[-1.0, 0.5], [1.5, -0.5], [0.0, 1.0]], 0.5, classes=[0, 1, 1], process=p)
    fake.seen = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, generator=g)
    cond = torch.randint(0, 2, (N,), generator=g)
    return teacher, fake, x, cond


def _loss(obj, teacher, fake, x, cond, seed=1):
    return obj.generator_loss(Batch(x=x, cond=cond, rng=torch.Generator().manual_seed(seed)),
                              Roles(teacher=teacher, fake=fake))["loss"]


@pytest.mark.parametrize("kappa", [-1.0, 0.0, 2.5])
def test_anti_cfg_reads_the_fake_as_canonical_cfg(kappa):
    teacher, fake, x, cond = _setup()
    obj = build_objective({"name": "sid", "alpha": 1.2, "fake_guidance_scale": kappa})
    loss = _loss(obj, teacher, fake, x, cond)
    # the same draws by hand: t, then the noise, from the batch generator
    g = torch.Generator().manual_seed(1)
    t = obj.time(N, teacher.process, generator=g)
    x_t = teacher.process.add_noise(x, torch.randn(x.shape, generator=g), t)
    f_r = teacher.denoise(x_t, t, cond)
    f_c, f_u = fake.denoise(x_t, t, cond), fake.denoise(x_t, t, torch.full_like(cond, NULL_CLASS))
    f_f = f_u + kappa * (f_c - f_u)
    omega = (x - f_r).abs().mean(1, keepdim=True).clamp(min=1e-5)
    expect = sid_elementwise(x, f_r, f_f, 1.2, omega).mean()
    assert torch.allclose(loss, expect, rtol=1e-5), (loss, expect)


def test_fake_scale_one_is_the_plain_conditional_fake_and_converts_from_cond_plus():
    teacher, fake, x, cond = _setup()
    plain = _loss(build_objective({"name": "sid"}), teacher, fake, x, cond)
    one = build_objective({"name": "sid", "fake_guidance_scale": 1.0})
    assert torch.equal(plain, _loss(one, teacher, fake, x, cond))
    # CausVid-style c + s (c - u) with s = -2 is canonical kappa = -1 (the conversion happens once, at build)
    assert build_objective({"name": "sid", "fake_guidance_scale": -2.0}, "cond_plus").p.fake_guidance_scale == -1.0


@pytest.mark.parametrize("kappa,sign", [(-1.0, 1), (0.0, 1), (3.0, -1)])
def test_anti_cfg_adds_the_conditional_direction_to_the_score_gap(kappa, sign):
    """With the fake equal to the teacher, f_phi - f_psi = (1 - kappa)(D_c - D_u): below 1 the generator's
    score gap points from the unconditional toward the conditional prediction (guidance), above 1 away."""
    teacher, _, x, cond = _setup()
    fake = Recording([[-2.0, 0.0], [2.0, 0.0]], 0.3, classes=[0, 1], process=teacher.process)
    fake.seen = []
    obj = build_objective({"name": "sid", "fake_guidance_scale": kappa})
    t = torch.full((N,), 0.6, dtype=torch.float64)
    x_t = teacher.process.add_noise(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), t)
    gap = teacher.denoise(x_t, t, cond) - obj.fake_prediction(fake, x_t, t, cond)
    direction = teacher.denoise(x_t, t, cond) - teacher.denoise(x_t, t, torch.full_like(cond, NULL_CLASS))
    assert torch.allclose(gap, (1 - kappa) * direction, atol=1e-5)
    proj = (gap * direction).sum(1)
    assert (sign * proj >= 0).all() and float(sign * proj.sum()) > 0


def test_zero_cfg_reads_and_trains_an_unconditional_fake():
    teacher, fake, x, cond = _setup()
    obj = build_objective({"name": "sid", "zero_cfg": True})
    assert "class_conditional" in obj.requirements()
    _loss(obj, teacher, fake, x, cond)
    assert fake.seen and all(bool((c == NULL_CLASS).all()) for c in fake.seen)
    fake.seen.clear()
    obj.auxiliary_losses(Batch(x=x, cond=cond, rng=torch.Generator().manual_seed(3)), Roles(teacher=teacher, fake=fake))
    assert fake.seen and all(bool((c == NULL_CLASS).all()) for c in fake.seen)
    # the default SiD keeps the labels (the check can fail)
    fake.seen.clear()
    _loss(build_objective({"name": "sid"}), teacher, fake, x, cond)
    assert not any(bool((c == NULL_CLASS).any()) for c in fake.seen)


@pytest.mark.parametrize("extra", [{"guidance_scale": 3.0}, {"fake_guidance_scale": -1.0}])
def test_zero_cfg_refuses_guidance(extra):
    with pytest.raises(ConfigError) as e:
        build_objective({"name": "sid", "zero_cfg": True, **extra})
    assert e.value.field == "objective.zero_cfg"
