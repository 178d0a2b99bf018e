"""Gaussian splats: initial shapes, colours, per-group learning rates, densify-and-prune with the
optimizer state carried over."""

import math

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.splat.cameras import turntable
from scoredistill.splat.gaussians import (
    DEFAULT_LR,
    SH_C0,
    Densifier,
    DensifyConfig,
    GaussianSplats,
    densify_and_prune,
    means_lr,
    quat_to_matrix,
    remap_adam_state,
)
from scoredistill.splat.render import render

pytestmark = pytest.mark.usefixtures("one_thread")


def test_initial_shapes():
    sph = GaussianSplats.sphere(400, radius=0.6, seed=1)
    assert torch.allclose(sph.means.norm(dim=1), torch.full((400,), 0.6), atol=1e-5)
    ball = GaussianSplats.ball(2000, radius=0.5, seed=1)
    r = ball.means.norm(dim=1)
    assert r.max() <= 0.5 + 1e-6 and (r < 0.25).float().mean().item() == pytest.approx(0.125, abs=0.03)
    assert torch.equal(GaussianSplats.ball(10, seed=4).means, GaussianSplats.ball(10, seed=4).means)
    assert ball.opacities().detach().mean().item() == pytest.approx(0.1, rel=1e-5)
    assert torch.allclose(ball.rotations(), torch.tensor([1.0, 0, 0, 0]).expand(2000, 4))
    assert ball.sh_degree == 0 and GaussianSplats.ball(5, sh_degree=1).sh_rest.shape == (5, 3, 3)
    with pytest.raises(ConfigError, match="splats.sh_degree"):
        GaussianSplats.ball(5, sh_degree=3)


def test_covariance_and_colours():
    s = GaussianSplats.from_points(torch.zeros(1, 3), torch.tensor([[0.1, 0.2, 0.3]]), (0.2, 0.4, 0.6))
    with torch.no_grad():
        s.quats.copy_(torch.tensor([[2 * math.cos(math.pi / 4), 0, 0, 2 * math.sin(math.pi / 4)]]))  # 90 deg about z
    cov = s.covariances()[0]
    assert torch.allclose(cov, torch.diag(torch.tensor([0.04, 0.01, 0.09])), atol=1e-6)
    assert torch.allclose(s.colors(), torch.tensor([[0.2, 0.4, 0.6]]), atol=1e-6)
    r = quat_to_matrix(torch.nn.functional.normalize(torch.randn(10, 4), dim=1))
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(10, 3, 3), atol=1e-5)
    # degree 1: seen along +x (camera at -x) the third coefficient counts with -C1
    s1 = GaussianSplats.from_points(torch.zeros(1, 3), 0.1, (0.5, 0.5, 0.5), sh_degree=1)
    with torch.no_grad():
        s1.sh_rest[0, 2] = torch.tensor([1.0, 0.0, 0.0])
    c = s1.colors(torch.tensor([[-2.0, 0, 0], [2.0, 0, 0]]))
    assert torch.allclose(c[:, 0, 0], torch.tensor([0.5 - 0.4886025, 0.5 + 0.4886025]), atol=1e-6)


def test_param_groups_have_3dgs_learning_rates():
    s = GaussianSplats.ball(10, sh_degree=1)
    groups = {g["name"]: g for g in s.param_groups(extent=2.0, lr={"sh_dc": 0.01})}
    assert set(groups) == {"means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest"}
    assert groups["means"]["lr"] == pytest.approx(3.2e-4)
    assert groups["sh_dc"]["lr"] == 0.01 and groups["quats"]["lr"] == DEFAULT_LR["quats"] == 1e-3
    assert groups["sh_rest"]["params"][0] is s.sh_rest
    assert means_lr(0) == pytest.approx(1.6e-4) and means_lr(30_000) == pytest.approx(1.6e-6)
    with pytest.raises(ConfigError, match="splats.lr.colors"):
        s.param_groups(lr={"colors": 0.1})
    with pytest.raises(ConfigError, match="splats.lr.means"):
        s.param_groups(lr={"means": -1})


def scene_for_densify():
    # 0: small & hot -> clone; 1: large & hot -> split; 2: cold, kept; 3: transparent -> pruned;
    # 4: cold but oversized in the world -> pruned
    pts = torch.tensor([[0.0, 0, 0], [0.2, 0, 0], [0, 0.2, 0], [0, 0, 0.2], [0.1, 0.1, 0.1]])
    scales = torch.tensor([0.005, 0.05, 0.005, 0.005, 0.2])
    s = GaussianSplats.from_points(pts, scales, (0.5, 0.5, 0.5), 0.5)
    with torch.no_grad():
        s.opacity_logits[3] = math.log(0.001 / 0.999)
    grads = torch.tensor([1e-3, 1e-3, 1e-5, 1e-3 * 0, 0.0])
    return s, grads


def test_densify_clone_split_prune():
    s, grads = scene_for_densify()
    old_means = s.means.detach().clone()
    res = densify_and_prune(s, grads, DensifyConfig(), torch.Generator().manual_seed(0))
    assert (res.cloned, res.split, res.pruned) == (1, 1, 2)
    # kept originals 0, 2 (1 was split, 3 and 4 pruned), the clone of 0, two children of 1
    assert res.source.tolist() == [0, 2, 0, 1, 1]
    assert res.fresh.tolist() == [False, False, True, True, True]
    assert s.num == 5 and all(p.shape[0] == 5 for p in s.parameters())
    assert torch.equal(s.means[2], old_means[0])  # a clone sits on its original
    children = s.means[3:].detach()
    assert not torch.equal(children[0], children[1]) and (children - old_means[1]).norm(dim=1).max() < 0.25
    assert torch.allclose(s.scales()[3:], torch.full((2, 3), 0.05 / 1.6))
    assert [g["params"][0] for g in res.groups] == list(s.named_groups().values())


def test_optimizer_state_is_carried_over():
    s, grads = scene_for_densify()
    opt = torch.optim.Adam(s.param_groups())
    for _ in range(2):
        opt.zero_grad()
        (s.means.square().sum() + s.colors().sum() + s.scales().sum() + s.opacities().sum()
         + s.quats.sum()).backward()
        opt.step()
    old = {g["name"]: {k: v.clone() for k, v in opt.state[g["params"][0]].items()} for g in opt.param_groups}
    res = densify_and_prune(s, grads, DensifyConfig(), torch.Generator().manual_seed(0))
    remap_adam_state(opt, s, res)
    for g in opt.param_groups:
        p = g["params"][0]
        assert p is getattr(s, g["name"])
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert torch.equal(st["exp_avg"][:2], old[g["name"]]["exp_avg"][[0, 2]])  # kept rows keep moments
        assert (st["exp_avg"][2:] == 0).all() and (st["exp_avg_sq"][2:] == 0).all()  # fresh rows start at 0
        assert float(st["step"]) == 2
    before = s.means.detach().clone()
    opt.zero_grad()
    s.means.square().sum().backward()
    opt.step()  # would fail on a shape mismatch
    assert not torch.equal(before, s.means.detach())


def test_densifier_schedule_with_renderer_gradients():
    s = GaussianSplats.ball(200, 0.3, seed=0, opacity=0.5)
    cfg = DensifyConfig(start=2, stop=10, every=2, grad_threshold=1e-9, opacity_reset_every=4, percent_dense=0.05,
                        extent=1.0, max_gaussians=260)
    d = Densifier(cfg, s.num)
    opt = torch.optim.Adam(s.param_groups())
    target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    counts = []
    for step in range(1, 5):
        res_r = render(s, turntable(2), 16, 16, 1.0, track_means2d=True)
        opt.zero_grad()
        (res_r.images - target).square().sum().backward()
        d.accumulate(res_r.means2d, res_r.visible, 16, 16, res_r.radii)
        opt.step()
        res = d.step(step, s)
        if res is not None:
            remap_adam_state(opt, s, res)
        counts.append(s.num)
    assert counts[0] == 200 and counts[1] > 200 and counts[1] <= 260
    assert d.resets == 1 and s.opacities().max() <= 0.01 + 1e-6  # reset at step 4
    assert d.grad_accum.shape == (s.num,) and d.grad_accum.sum() == 0  # statistics restart after a change
    assert res.reset == ("opacity_logits",)
    assert (opt.state[s.opacity_logits]["exp_avg"] == 0).all()


def test_densify_config_errors():
    with pytest.raises(ConfigError, match="densify.grad_threshold"):
        DensifyConfig.from_config({"grad_threshold": 0})
    with pytest.raises(ConfigError, match="densify.every"):
        DensifyConfig.from_config({"every": -1})
    with pytest.raises(ConfigError, match="densify.interval"):
        DensifyConfig.from_config({"interval": 100})
    assert DensifyConfig.from_config(None).grad_threshold == 2e-4


def test_sh_dc_encoding():
    s = GaussianSplats.from_points(torch.zeros(2, 3), 0.1, torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]]))
    assert torch.allclose(s.sh_dc[0], torch.tensor([-0.5, 0.0, 0.5]) / SH_C0)


def test_resume_after_densify_from_state_dict():
    s, grads = scene_for_densify()
    densify_and_prune(s, grads, DensifyConfig(), torch.Generator().manual_seed(0))
    back = GaussianSplats.from_state_dict(s.state_dict())
    assert back.num == s.num == 5
    for (n, p), (_, q) in zip(s.named_groups().items(), back.named_groups().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ConfigError, match="state has no means"):
        GaussianSplats.from_state_dict({})
