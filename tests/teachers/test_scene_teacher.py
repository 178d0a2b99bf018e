"""Exact-render teacher: its denoiser is the GMM posterior mean with per-camera means."""

import math

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.process.processes import EDM, RectifiedFlow, VPDiscrete
from scoredistill.splat.cameras import Cameras, sample_cameras
from scoredistill.splat.presets import PRESETS, preset_scene
from scoredistill.teachers.scene import SceneTeacher, build_scene_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 12


def teacher(process, scenes=("snowman", "dumbbell"), weights=(0.3, 0.7), std=0.3):
    return build_scene_teacher({"kind": "scene", "scenes": list(scenes), "weights": list(weights), "std": std,
                                "resolution": RES}, process)


def cond(n=3, seed=0):
    return sample_cameras(n, generator=torch.Generator().manual_seed(seed)).as_cond()


def tweedie(t: SceneTeacher, x, tt, c):
    """Brute force: x0 = (x + sigma^2 grad log p_t(x)) / alpha with log p_t written out per item as a
    mixture of diagonal normals (torch.distributions) and its gradient taken by autograd."""
    renders = t.renders(c).reshape(x.shape[0], t.num_scenes, -1)
    a, s = t.process.alpha(tt), t.process.sigma(tt)
    out = []
    for i in range(x.shape[0]):
        xi = x[i].reshape(-1).double().clone().requires_grad_(True)
        std = math.sqrt(float(a[i] ** 2 * t.std**2 + s[i] ** 2))
        logs = torch.stack([torch.distributions.Normal(a[i] * renders[i, k], std).log_prob(xi).sum()
                            + t.weights[k].log() for k in range(t.num_scenes)])
        (g,) = torch.autograd.grad(torch.logsumexp(logs, 0), xi)
        out.append(((xi + s[i] ** 2 * g) / a[i]).detach())
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("process", [EDM(), VPDiscrete(), RectifiedFlow(shift=3.0)], ids=["edm", "vp", "flow"])
def test_denoiser_equals_brute_force_posterior_mean(process):
    t = teacher(process)
    c = cond(4)
    g = torch.Generator().manual_seed(1)
    x0, k = t.sample(c, g, return_components=True)
    tt = torch.tensor([0.05, 0.3, 0.5, 0.7], dtype=torch.float64)
    x = (t.process.alpha(tt)[:, None, None, None] * x0
         + t.process.sigma(tt)[:, None, None, None] * torch.randn(x0.shape, generator=g)).float()
    d = t.denoise(x, tt, c)
    ref = tweedie(t, x, tt, c)
    assert d.shape == x.shape == (4, 3, RES, RES)
    assert torch.allclose(d.double(), ref, atol=2e-4, rtol=1e-4), (d.double() - ref).abs().max()
    r = t.responsibilities(x, tt, c)
    assert torch.allclose(r.sum(1), torch.ones(4, dtype=torch.float64))
    assert r.min(1).values.max() > 0.01  # at the highest noise both scenes share the posterior


def test_t_to_zero_returns_x_t():
    t = teacher(EDM())
    c = cond(3)
    x = torch.randn(3, 3, RES, RES)
    errs = [(t.denoise(x, torch.full((3,), tt), c) - x).abs().max().item() for tt in (0.2, 0.1, 0.0)]
    # at t = 0 (sigma = 0.002 << s = 0.3) the shrinkage sigma^2 / (s^2 + sigma^2) is 4.4e-5
    assert errs[2] < 5e-4 and errs[0] > errs[1] > 20 * errs[2]


def test_one_scene_at_high_noise_returns_its_render():
    t = build_scene_teacher({"scenes": ["table"], "std": 0.05, "resolution": RES}, VPDiscrete())
    c = cond(2, seed=5)
    x = torch.randn(2, 3, RES, RES)
    d = t.denoise(x, torch.full((2,), 0.999), c)
    ren = t.renders(c)[:, 0].float()
    assert torch.allclose(d, ren, atol=1e-3)
    assert ren.min() >= -1 and ren.max() <= 1 and ren.std() > 0.1  # a real image on the [-1, 1] scale
    # and the render depends on the camera
    assert not torch.allclose(ren[0], ren[1], atol=0.05)


def test_posterior_picks_the_scene_a_clean_view_came_from():
    t = teacher(EDM(), std=0.05)
    c = cond(2, seed=2)
    x0, k = t.sample(c, torch.Generator().manual_seed(0), return_components=True)
    r = t.responsibilities(x0, torch.full((2,), 0.1), c)
    assert torch.equal(r.argmax(1), k) and (r.max(1).values > 0.999).all()
    assert t.guided(x0, torch.full((2,), 0.1), c, 7.5).equal(t.denoise(x0, torch.full((2,), 0.1), c))


def test_presets_are_small_and_fit_the_default_cameras():
    for name in PRESETS:
        s = preset_scene(name)
        assert 150 <= s.num <= 500, name
        assert s.means.norm(dim=1).max() < 0.4, name


def test_config_errors():
    with pytest.raises(ConfigError, match="teacher.scenes: missing or empty"):
        build_scene_teacher({"kind": "scene"}, EDM())
    with pytest.raises(ConfigError, match="teacher.scenes: missing or empty"):
        build_scene_teacher({"kind": "scene", "scenes": []}, EDM())
    with pytest.raises(ConfigError, match=r"teacher.scenes\[1\]: unknown preset scene 'teapot'"):
        build_scene_teacher({"scenes": ["table", "teapot"]}, EDM())
    with pytest.raises(ConfigError, match=r"teacher.scenes\[0\]: file not found"):
        build_scene_teacher({"scenes": ["/nonexistent/a.ply"]}, EDM())
    with pytest.raises(ConfigError, match="teacher.weights"):
        build_scene_teacher({"scenes": ["table", "snowman"], "weights": [1.0]}, EDM())
    with pytest.raises(ConfigError, match="teacher.std"):
        build_scene_teacher({"scenes": ["table"], "std": 0}, EDM())
    with pytest.raises(ConfigError, match="teacher.resolution"):
        build_scene_teacher({"scenes": ["table"], "resolution": [8]}, EDM())
    with pytest.raises(ConfigError, match="teacher.scene_list"):
        build_scene_teacher({"scene_list": ["table"]}, EDM())
    t = teacher(EDM())
    with pytest.raises(ConfigError, match="cond"):
        t.denoise(torch.zeros(1, 3, RES, RES), torch.zeros(1), None)


def test_scene_from_ply(tmp_path):
    preset_scene("dumbbell").save_ply(tmp_path / "d.ply")
    a = build_scene_teacher({"scenes": [str(tmp_path / "d.ply")], "resolution": RES}, EDM())
    b = build_scene_teacher({"scenes": ["dumbbell"], "resolution": RES}, EDM())
    c = Cameras.from_cond(cond(2)).as_cond()
    assert torch.allclose(a.renders(c), b.renders(c), atol=1e-6)
    assert a.describe()["scenes"] == [str(tmp_path / "d.ply")]
