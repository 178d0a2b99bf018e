import math

import pytest
import torch

from scoredistill.config import ConfigError
from scoredistill.process import EDM, RectifiedFlow, VPDiscrete
from scoredistill.teachers.gmm import PRESETS, GMMTeacher, build_gmm


def mc_posterior_mean(g: GMMTeacher, x_t, t, n=200_000, cond=None):
    """E[x0 | x_t] by self-normalised importance sampling with exact prior samples."""
    gen = torch.Generator().manual_seed(3)
    c = None if cond is None else torch.full((n,), cond)
    x0 = g.sample(n, cond=c, generator=gen).double()
    a, s = float(g.process.alpha(t)), float(g.process.sigma(t))
    logw = -((x_t.double()[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s * s)
    w = torch.softmax(logw, 1)
    return w @ x0


@pytest.mark.parametrize("process", [EDM(), VPDiscrete(), RectifiedFlow(shift=2.0)], ids=lambda p: p.name)
def test_exact_denoiser_matches_monte_carlo(process):
    g = build_gmm({"preset": "asym"}, process)
    t = torch.tensor(0.45, dtype=torch.float64) if process.name == "edm" else torch.tensor(0.3, dtype=torch.float64)
    x_t = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-1.5, 0.5]])
    exact = g(x_t, t.expand(3)).double()
    mc = mc_posterior_mean(g, x_t, t)
    assert torch.allclose(exact, mc, atol=0.03), (exact, mc)


def test_tweedie_score_equals_grad_log_prob():
    g = build_gmm({"preset": "ring8"}, EDM())
    x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    t = torch.full((16,), 0.5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(g.log_prob(x, t).sum(), x)
    score = g.process.score(x.detach(), g(x.detach(), t), t)
    assert torch.allclose(grad, score, atol=1e-8)


def test_conditional_restricts_components_and_null_is_full_mixture():
    g = build_gmm({"preset": "ring8_cond"}, EDM())
    assert g.num_classes == 4
    x, k = g.sample(4000, cond=torch.full((4000,), 2), generator=torch.Generator().manual_seed(0),
                    return_components=True)
    assert set(k.tolist()) == {2, 6}
    x_t = torch.randn(8, 2)
    t = torch.full((8,), 0.6, dtype=torch.float64)
    full = GMMTeacher(g.means, g.stds, g.weights, None, g.process)
    assert torch.allclose(g(x_t, t, torch.full((8,), -1)), full(x_t, t))
    # w = 1 guidance is the conditional model, w = 0 the unconditional one
    c = torch.full((8,), 1)
    assert torch.allclose(g.guided(x_t, t, c, 1.0), g(x_t, t, c))
    assert torch.allclose(g.guided(x_t, t, c, 0.0), full(x_t, t), atol=1e-6)


def test_sampler_moments():
    g = build_gmm({"preset": "pair"}, EDM())
    x, k = g.sample(100_000, generator=torch.Generator().manual_seed(0), return_components=True)
    assert float((k == 0).double().mean()) == pytest.approx(0.8, abs=0.01)
    assert float(x[:, 0].mean()) == pytest.approx(0.8 * -1.5 + 0.2 * 1.5, abs=0.02)
    assert g.data_std() == pytest.approx(float(x.var(0).mean().sqrt()), rel=0.01)


def test_presets_and_any_dimension():
    for name in PRESETS:
        g = build_gmm({"preset": name}, EDM())
        assert g.means.shape[0] >= 2
    g = build_gmm({"preset": "ring8", "dim": 6}, EDM())
    assert g.data_shape == (6,)
    assert build_gmm({"preset": "gmm10d"}, EDM()).data_shape == (10,)


@pytest.mark.parametrize("cfg,field", [
    ({"means": [[0, 0], [1]], "std": 0.1}, "teacher.means"),
    ({"means": [[0, 0], [1, 1]], "std": 0.1, "weights": [1.0]}, "teacher.weights"),
    ({"means": [[0, 0], [1, 1]], "std": -0.1}, "teacher.std"),
    ({"means": [[0, 0], [1, 1]], "stds": [0.1]}, "teacher.stds"),
    ({"preset": "ring9"}, "teacher.preset"),
    ({"std": 0.1}, "teacher.means"),
])
def test_bad_gmm_config(cfg, field):
    with pytest.raises(ConfigError) as e:
        build_gmm(cfg, EDM())
    assert e.value.field == field


def test_log_prob_normalised_1d():
    g = GMMTeacher([[0.0], [2.0]], [0.3, 0.5], [0.4, 0.6], process=EDM())
    x = torch.linspace(-6, 8, 4001, dtype=torch.float64)[:, None]
    p = g.log_prob(x, torch.full((len(x),), 0.3, dtype=torch.float64)).exp()
    assert float(torch.trapezoid(p, x[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert not math.isnan(float(p.sum()))
