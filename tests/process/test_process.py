import pytest
import torch

from scoredistill.config import ConfigError
from scoredistill.process import (
    EDM,
    LogitNormal,
    LogNormal,
    RectifiedFlow,
    Shifted,
    Uniform,
    VPContinuous,
    VPDiscrete,
    canonical_scale,
    cfg_combine,
    from_cond_plus,
    make_process,
)

PROCESSES = [VPDiscrete(), VPDiscrete(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             VPDiscrete(beta_schedule="cosine"), VPContinuous(), EDM(), RectifiedFlow(), RectifiedFlow(shift=3.0)]


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: f"{p.name}")
def test_conversions_round_trip(p):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g)
    eps = torch.randn(64, 3, generator=g)
    t = p.t_min + (p.t_max - p.t_min) * torch.rand(64, generator=g, dtype=torch.float64)
    t = t.clamp(max=p.t_max * 0.999 if p.name != "edm" else 1.0)
    x_t = p.add_noise(x0, eps, t)
    for kind in ("x0", "eps", "v", "flow"):
        pred = p.from_x0(x_t.double(), x0.double(), t, kind)
        back = p.to_x0(x_t.double(), pred, t, kind)
        assert torch.allclose(back, x0.double(), atol=1e-6, rtol=1e-6), kind
    # eps prediction of the true x0 is the true noise
    e = p.from_x0(x_t.double(), x0.double(), t, "eps")
    assert torch.allclose(e, eps.double(), atol=1e-4 * max(1.0, float(p.rho(t).max())))


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: f"{p.name}")
def test_rho_inverse_and_monotone(p):
    t = torch.linspace(p.t_min, p.t_max, 101, dtype=torch.float64)
    r = p.rho(t)
    assert torch.all(r[1:] > r[:-1])
    assert torch.allclose(p.t_from_rho(r), t, atol=1e-7)


def test_edm_time_is_karras_ramp():
    p = EDM()
    assert float(p.sigma(0.0)) == pytest.approx(0.002)
    assert float(p.sigma(1.0)) == pytest.approx(80.0)
    # SiD's sigma sampling with t_max = 800: u = 0.8 -> sigma ~ 24.4 (methods.md §3.6)
    assert float(p.sigma(0.8)) == pytest.approx(24.4, abs=0.2)


def test_vp_discrete_grid_matches_ddpm_alphas():
    p = VPDiscrete()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    n = torch.tensor([0, 20, 500, 980, 999])
    assert torch.allclose(p.alpha(n.double() / 1000.0) ** 2, ab[n], rtol=1e-10)
    assert torch.allclose(p.native_time(n.double() / 1000.0), n.double())


def test_flow_shift():
    p = RectifiedFlow(shift=3.0)
    t = torch.tensor([0.25, 0.5])
    s = 3 * t / (1 + 2 * t)
    assert torch.allclose(p.sigma(t), s.double())
    assert torch.allclose(p.alpha(t), 1 - s.double())


def test_cfg_canonical_and_conversion():
    u, c = torch.randn(5), torch.randn(5)
    assert torch.allclose(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    # threestudio's guidance_scale=100 in cond + s(cond - uncond) is canonical w = 101
    assert from_cond_plus(100) == 101
    assert torch.allclose(c + 3.0 * (c - u), cfg_combine(u, c, canonical_scale(3.0, "cond_plus")))


@pytest.mark.parametrize("sampler", [Uniform(0.02, 0.98), Uniform(0.02, 0.98, discrete=1000), LogNormal(),
                                     LogitNormal(), Shifted(5.0)], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("p", [EDM(), VPDiscrete(), RectifiedFlow()], ids=lambda p: p.name)
def test_time_samplers_in_range(sampler, p):
    t = sampler(4096, p, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,)
    assert float(t.min()) >= p.t_min - 1e-12 and float(t.max()) <= p.t_max + 1e-12


def test_uniform_discrete_is_ddpm_randint():
    t = Uniform(0.02, 0.98, discrete=1000)(20000, VPDiscrete(), generator=torch.Generator().manual_seed(1))
    n = (t * 1000).round()
    assert torch.allclose(t * 1000, n)
    assert int(n.min()) == 20 and int(n.max()) == 980


def test_lognormal_matches_rho_distribution():
    p = VPDiscrete()
    t = LogNormal(-1.2, 1.2)(20000, p, generator=torch.Generator().manual_seed(2))
    lr = p.rho(t).log()
    inside = (lr > torch.log(torch.tensor(p.rho_min))) & (lr < torch.log(torch.tensor(p.rho_max)))
    assert float(lr[inside].mean()) == pytest.approx(-1.2, abs=0.05)


def test_make_process_errors():
    with pytest.raises(ConfigError, match="teacher.process.kind"):
        make_process({"kind": "ddpm"})
    with pytest.raises(ConfigError, match="teacher.process.bogus"):
        make_process({"kind": "edm", "bogus": 1})
    assert isinstance(make_process({"kind": "flow", "shift": 3}), RectifiedFlow)


@pytest.mark.parametrize("spec,field", [
    ({"kind": "edm", "sigma_max": float("inf")}, "teacher.process.sigma_max"),
    ({"kind": "edm", "sigma_min": float("nan")}, "teacher.process.sigma_min"),
    ({"kind": "edm", "sigma_min": 90.0}, "teacher.process.sigma_min"),
    ({"kind": "edm", "rho": -7}, "teacher.process.rho_karras"),
    ({"kind": "vp", "num_steps": 1}, "teacher.process.num_steps"),
    ({"kind": "vp", "num_steps": 10.5}, "teacher.process.num_steps"),
    ({"kind": "vp", "beta_start": 0.1, "beta_end": 0.01}, "teacher.process.beta_start"),
    ({"kind": "flow", "shift": 0}, "teacher.process.shift"),
    ({"kind": "vp_continuous", "eps": "small"}, "teacher.process.eps"),
])
def test_make_process_refuses_non_finite_and_inconsistent_values(spec, field):
    with pytest.raises(ConfigError) as e:
        make_process(spec)
    assert e.value.field == field and "\n" not in str(e.value)


@pytest.mark.parametrize("spec,field", [
    ({"kind": "uniform", "t_min": 0.9, "t_max": 0.1}, "objective.time.t_min"),
    ({"kind": "uniform", "t_max": 1.5}, "objective.time.t_max"),
    ({"kind": "uniform", "t_min": float("nan")}, "objective.time.t_min"),
    ({"kind": "uniform", "discrete": 0}, "objective.time.discrete"),
    ({"kind": "uniform", "per_batch": "yes"}, "objective.time.per_batch"),
    ({"kind": "lognormal", "p_std": 0}, "objective.time.p_std"),
    ({"kind": "logit_normal", "m": float("inf")}, "objective.time.m"),
    ({"kind": "shifted", "t_min": 0.5, "t_max": 0.2}, "objective.time.t_min"),
    ({"kind": "gaussian"}, "objective.time.kind"),
    ("uniform", "objective.time"),
])
def test_make_time_sampler_refuses_bad_specs(spec, field):
    from scoredistill.process.time import make_time_sampler

    with pytest.raises(ConfigError) as e:
        make_time_sampler(spec, "objective.time", Uniform())
    assert e.value.field == field and "\n" not in str(e.value)


def test_make_time_sampler_accepts_edges():
    from scoredistill.process.time import make_time_sampler

    s = make_time_sampler({"kind": "uniform", "t_min": 0, "t_max": 1, "discrete": 1000}, "objective.time", Uniform())
    assert (s.t_min, s.t_max, s.discrete) == (0, 1, 1000)
    assert make_time_sampler(None, "objective.time", Uniform(0.1, 0.2)) == Uniform(0.1, 0.2)
