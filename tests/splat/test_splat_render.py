"""The pure-PyTorch splatting renderer against finite differences, the analytic projection of one
Gaussian, depth ordering, and chunking (same output, bounded saved memory)."""

import math

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.splat.cameras import Cameras, turntable
from scoredistill.splat.gaussians import SH_C0, GaussianSplats
from scoredistill.splat.render import (
    FixedBackground,
    LearnedBackground,
    RandomBackground,
    make_background,
    render,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def cams(el, az, dist=1.2, fov=50.0, dtype=torch.float64):
    el = torch.as_tensor(el, dtype=dtype).reshape(-1)
    az = torch.as_tensor(az, dtype=dtype).reshape(-1)
    n = len(el)
    return Cameras(el, az, torch.full((n,), dist, dtype=dtype), torch.full((n,), fov, dtype=dtype))


def tiny_scene():
    g = torch.Generator().manual_seed(1)
    n = 3
    means = torch.tensor([[0.05, -0.1, 0.02], [-0.1, 0.08, -0.05], [0.0, 0.02, 0.12]])
    q = torch.randn(n, 4, generator=g)
    log_scales = torch.log(torch.tensor([[0.08, 0.05, 0.11], [0.06, 0.09, 0.07], [0.1, 0.07, 0.05]]))
    opac = torch.logit(torch.tensor([0.6, 0.45, 0.7]))
    rgb = 0.25 + 0.5 * torch.rand(n, 3, generator=g)
    rest = 0.1 * torch.randn(n, 3, 3, generator=g)
    return GaussianSplats(means, log_scales, q, opac, (rgb - 0.5) / SH_C0, rest).double()


def test_gradients_match_central_finite_differences():
    s = tiny_scene()
    c = cams([10.0, 35.0], [20.0, -60.0])
    g = torch.Generator().manual_seed(2)
    wi, wa, wd = (torch.randn(2, 3, 12, 12, generator=g, dtype=torch.float64),
                  torch.randn(2, 12, 12, generator=g, dtype=torch.float64),
                  torch.randn(2, 12, 12, generator=g, dtype=torch.float64))
    bg = torch.tensor([[0.2, 0.4, 0.9], [0.7, 0.1, 0.3]], dtype=torch.float64)

    def loss():
        im, al, de = render(s, c, 12, 12, bg, tile_size=6, chunk_size=2)
        return (im * wi).sum() + (al * wa).sum() + 0.1 * (de * wd).sum()

    s.zero_grad()
    loss().backward()
    eps = 1e-6
    checked = 0
    for name, p in s.named_groups().items():
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + eps
                lp = loss().item()
                flat[i] = old - eps
                lm = loss().item()
                flat[i] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - grad[i].item()) <= 1e-6 + 1e-5 * abs(fd), (name, i, fd, grad[i].item())
            checked += 1
        assert p.grad.abs().max() > 0, name
    assert checked == 3 * (3 + 3 + 4 + 1 + 3 + 9)


@pytest.mark.parametrize("scale,dist,fov", [(0.02, 1.2, 50.0), (0.05, 2.0, 35.0)])
def test_isotropic_gaussian_matches_analytic_projection(scale, dist, fov):
    s = GaussianSplats.from_points(torch.zeros(1, 3), scale, (1.0, 1.0, 1.0), 0.8).double()
    o = s.opacities().item()
    h = w = 63  # odd: the projected centre (31.5, 31.5) is the centre of pixel (31, 31)
    c = cams([20.0], [70.0], dist=dist, fov=fov)
    with torch.no_grad():
        res = render(s, c, h, w, 0.0)
    img = res.images[0, 0]
    f = 0.5 * h / math.tan(math.radians(fov / 2))
    sigma_px = f * scale / dist
    assert torch.allclose(res.means2d[0, 0], torch.tensor([31.5, 31.5], dtype=torch.float64))
    assert divmod(int(img.argmax()), w) == (31, 31)
    col = s.colors()[0, 0].item()  # 1 up to the float32 rounding of the stored SH coefficient
    assert img[31, 31].item() == pytest.approx(o * col, abs=1e-12)  # peak opacity at the centre
    # the profile is o exp(-k^2 / (2 (sigma^2 + 0.3))) along a row: recover sigma from it
    k = torch.arange(1, 4, dtype=torch.float64)
    prof = img[31, 31 + k.long()] / col
    var = (k * k / (2 * torch.log(o / prof))).mean() - 0.3
    assert math.sqrt(var) == pytest.approx(sigma_px, rel=1e-6)
    assert torch.allclose(img, img.T, atol=1e-12)  # isotropic
    assert res.depth[0, 31, 31].item() == pytest.approx(dist, rel=1e-12)


def test_off_centre_point_projects_with_pinhole():
    s = GaussianSplats.from_points(torch.tensor([[0.0, 0.1, 0.05]]), 0.01, (1.0, 1.0, 1.0), 0.5).double()
    c = cams([0.0], [0.0], dist=1.0, fov=60.0)
    res = render(s, c, 40, 40)
    f = 20 / math.tan(math.radians(30))
    # camera on +x looking at the origin: world +y is image right, world +z image up
    assert torch.allclose(res.means2d[0, 0], torch.tensor([20 + f * 0.1, 20 - f * 0.05], dtype=torch.float64))


def two_blobs():
    return GaussianSplats.from_points(torch.tensor([[0.3, 0.0, 0.0], [-0.3, 0.0, 0.0]]), 0.15,
                                      torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), 0.99).double()


def test_near_opaque_gaussian_hides_far_one():
    s = two_blobs()
    res = render(s, cams([0.0, 0.0], [0.0, 180.0], dist=1.5), 31, 31, 1.0)
    front, back = res.images[0, :, 15, 15], res.images[1, :, 15, 15]
    assert front[0] > 0.98 and front[2] < 0.02  # red (at +x) in front seen from +x
    assert back[2] > 0.98 and back[0] < 0.02  # blue in front seen from -x
    assert res.depth[0, 15, 15].item() == pytest.approx(1.2, abs=0.02)
    # the input order of the Gaussians does not matter, only depth
    s2 = GaussianSplats.from_points(torch.tensor([[-0.3, 0.0, 0.0], [0.3, 0.0, 0.0]]), 0.15,
                                    torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), 0.99).double()
    res2 = render(s2, cams([0.0, 0.0], [0.0, 180.0], dist=1.5), 31, 31, 1.0)
    assert torch.allclose(res.images, res2.images, atol=1e-12)


def test_behind_camera_and_faint_gaussians_are_skipped():
    s = GaussianSplats.from_points(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 0.2, (1.0, 0.0, 0.0), 0.5)
    with torch.no_grad():
        s.opacity_logits[1] = math.log(0.003 / 0.997)  # below 1/255 everywhere
    res = render(s, cams([0.0], [0.0], dist=1.0, dtype=torch.float32), 16, 16, 0.5)
    assert torch.equal(res.images, torch.full_like(res.images, 0.5))
    assert not res.visible.any()


def test_chunked_equals_unchunked_and_gradients_too():
    s = GaussianSplats.ball(300, 0.35, seed=3, opacity=0.5).double()
    c = turntable(2, dtype=torch.float64)
    outs = []
    for kw in ({"tile_size": 64, "chunk_size": 100000, "checkpoint": False},
               {"tile_size": 7, "chunk_size": 37, "checkpoint": True}):
        s.zero_grad()
        res = render(s, c, 40, 40, (0.3, 0.6, 0.9), **kw)
        (res.images.square().sum() + res.depth.sum()).backward()
        outs.append((res.images.detach(), res.alpha.detach(), res.depth.detach(),
                     [p.grad.clone() for p in s.parameters()]))
    a, b = outs
    for x, y in zip(a[:3], b[:3]):
        assert torch.allclose(x, y, atol=1e-12)
    for x, y in zip(a[3], b[3]):
        assert torch.allclose(x, y, atol=1e-10)
    assert a[1].max() > 0.5  # the scene is actually drawn


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_memory_saved_for_backward_is_bounded_when_chunked():
    """With checkpointed chunks autograd keeps O(N + pixels) tensors, not O(N x pixels)."""
    def run(n, ckpt):
        s = GaussianSplats.ball(n, 0.3, seed=0, opacity=0.5, color=(0.5, 0.5, 0.5))
        with torch.no_grad():
            s.log_scales.fill_(math.log(0.3))  # every Gaussian covers the whole 32 x 32 image
        c = turntable(1)
        return saved_bytes(lambda: render(s, c, 32, 32, chunk_size=256, checkpoint=ckpt).images.sum())

    pairs = 32 * 32 * 2000 * 4  # one float32 per Gaussian-pixel pair
    dense = run(2000, False)
    chunked = run(2000, True)
    assert dense > pairs  # the dense graph holds several (pixels x Gaussians) tensors
    assert chunked < dense / 20 and chunked < pairs / 3
    assert run(4000, True) < 2.5 * chunked  # grows with N linearly, not with N x pixels


def test_backgrounds():
    s = two_blobs()
    c = cams([0.0, 0.0, 0.0], [90.0, 90.0, 90.0], dist=3.0)
    fixed = render(s, c, 16, 16, FixedBackground((0.1, 0.2, 0.3)))
    assert torch.allclose(fixed.images[:, :, 0, 0], torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).expand(3, 3))
    r1 = render(s, c, 16, 16, RandomBackground(5)).images[:, :, 0, 0]
    r2 = render(s, c, 16, 16, RandomBackground(5)).images[:, :, 0, 0]
    assert torch.equal(r1, r2) and not torch.allclose(r1[0], r1[1])
    learned = LearnedBackground(0.25)
    img = render(s, c, 16, 16, learned).images
    assert torch.allclose(img[:, :, 0, 0], torch.full((3, 3), 0.25, dtype=torch.float64), atol=1e-6)
    img.sum().backward()
    assert learned.raw.grad is not None and (learned.raw.grad > 0).all()
    assert isinstance(make_background({"kind": "random"}, seed=1), RandomBackground)
    with pytest.raises(ConfigError, match="render.background.kind"):
        make_background({"kind": "sky"})
    with pytest.raises(ConfigError, match="render.background.color"):
        make_background({"kind": "fixed", "color": [2, 0, 0]})


def test_images_stay_in_unit_range_and_backend_errors():
    s = GaussianSplats.ball(200, 0.3, seed=1, opacity=0.9)
    with torch.no_grad():
        s.sh_dc.mul_(5)  # colours far outside [0, 1] before clamping
    im = render(s, turntable(2), 24, 24, 1.0).images
    assert im.min() >= 0 and im.max() <= 1
    with pytest.raises(ConfigError, match="render.backend: unknown value 'cuda'"):
        render(s, turntable(1), 8, 8, backend="cuda")
    with pytest.raises(ConfigError, match=r"render\.backend.*pip install scoredistill\[3d\]") as e:
        render(s, turntable(1), 8, 8, backend="gsplat")  # CPU tensors: gsplat cannot run
    assert "\n" not in str(e.value)
