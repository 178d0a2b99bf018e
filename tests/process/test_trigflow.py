"""TrigFlow coordinates over the library's processes (arXiv 2410.11081): exact state and time maps,
output conversions, the PF-ODE drift on an exact Gaussian, and the one-line error for a process that
TrigFlow cannot express."""

import math
from dataclasses import dataclass

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.process import EDM, RectifiedFlow, VPContinuous, VPDiscrete
from scoredistill.process.processes import Process
from scoredistill.process.trigflow import TrigFlow, check_expressible
from scoredistill.teachers.gmm import GMMTeacher

PROCESSES = {
    "edm": EDM(),
    "vp_linear": VPDiscrete(),
    "vp_cosine": VPDiscrete("cosine"),
    "vp_continuous": VPContinuous(),
    "flow": RectifiedFlow(),
    "flow_shift3": RectifiedFlow(shift=3.0),
}
ids = list(PROCESSES)


def _times(p: Process, n=64):
    # interior times: the very ends have rho = 0 (VP at t = 0) where tau = 0 and 1/sin(tau) is infinite
    lo, hi = p.t_min, p.t_max
    return torch.linspace(lo + 0.01 * (hi - lo), hi - 0.01 * (hi - lo), n, dtype=torch.float64)


@pytest.mark.parametrize("name", ids)
@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_trigflow_state_is_rescaled_process_state(name, sd):
    """``cos(tau) x0 + sd sin(tau) eps`` equals ``k(t) (a_t x0 + s_t eps)`` with the same eps."""
    p = PROCESSES[name]
    trig = TrigFlow(p, sd)
    t = _times(p)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    x_t = p.add_noise(x0, eps, t)
    x_tau = trig.add_noise(x0, eps, trig.tau(t))
    assert torch.allclose(trig.to_trig(x_t, t), x_tau, rtol=1e-12, atol=1e-12)
    assert torch.allclose(trig.from_trig(x_tau, t), x_t, rtol=1e-12, atol=1e-12)
    # sd tan(tau) is the process's noise-to-signal ratio
    assert torch.allclose(trig.rho_of_tau(trig.tau(t)), p.rho(t), rtol=1e-12)


@pytest.mark.parametrize("name", ids)
def test_time_round_trip_and_derivative(name):
    p = PROCESSES[name]
    trig = TrigFlow(p, 0.5)
    t = _times(p)
    tau = trig.tau(t)
    assert (tau[1:] > tau[:-1]).all() and tau.min() > 0 and tau.max() < math.pi / 2
    assert torch.allclose(trig.t_from_tau(tau), t, rtol=0, atol=1e-9)
    h = 1e-6
    fd = (trig.tau(t + h) - trig.tau(t - h)) / (2 * h)
    # (no sample sits on a knot of VPDiscrete's piecewise-linear log alpha_bar, where one-sided slopes differ)
    assert torch.allclose(trig.dtau_dt(t), fd, rtol=1e-6)


@pytest.mark.parametrize("name", ids)
def test_output_conversions_round_trip(name):
    p = PROCESSES[name]
    trig = TrigFlow(p, 0.5)
    t = _times(p)
    tau = trig.tau(t)
    g = torch.Generator().manual_seed(2)
    x_tau = torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    d = torch.randn(len(t), 4, generator=g, dtype=torch.float64)
    f = trig.f_from_x0(x_tau, tau, d)
    assert torch.allclose(trig.x0_from_f(x_tau, tau, f), d, rtol=1e-10, atol=1e-10)
    assert torch.allclose(trig.velocity_from_x0(x_tau, tau, d), 0.5 * f, rtol=1e-12)


@pytest.mark.parametrize("name", ids)
def test_pf_ode_drift_on_exact_gaussian(name):
    """For data ``N(0, s^2 I)`` every PF-ODE path is ``x_tau ∝ std(tau)`` with
    ``std^2 = cos^2 s^2 + sin^2 sd^2``, so ``dx/dtau = x (sd^2 - s^2) sin cos / std^2``; the drift from
    the exact (GMM) denoiser must be exactly that."""
    p = PROCESSES[name]
    s, sd = 0.7, 0.5
    teacher = GMMTeacher([[0.0, 0.0]], s, process=p)
    trig = TrigFlow(p, sd)
    t = _times(p, 32)
    tau = trig.tau(t)
    x_tau = torch.randn(len(t), 2, dtype=torch.float64)
    d = trig.denoise(teacher, x_tau, t)
    v = trig.velocity_from_x0(x_tau, tau, d)
    c, sn = torch.cos(tau)[:, None], torch.sin(tau)[:, None]
    expect = x_tau * (sd * sd - s * s) * sn * c / (c * c * s * s + sn * sn * sd * sd)
    assert torch.allclose(v, expect, rtol=1e-8, atol=1e-10)
    # F of the denoiser round-trips to the same denoiser output
    f = trig.F(teacher, x_tau, t)
    assert torch.allclose(trig.x0_from_f(x_tau, tau, f), d, rtol=1e-10, atol=1e-12)


@dataclass
class _Bumpy(Process):
    """A schedule whose noise-to-signal ratio goes up, down and up again (not expressible)."""

    name: str = "bumpy"

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return 0.5 + t + 0.3 * torch.sin(6 * math.pi * t)


@dataclass
class _Dead(Process):
    """Signal scale reaching zero inside the range (zero terminal SNR)."""

    name: str = "dead"

    def _alpha(self, t):
        return 1 - t

    def _sigma(self, t):
        return t


@pytest.mark.parametrize("proc, what", [(_Bumpy(), "not strictly increasing"), (_Dead(), "alpha(t) <= 0")])
def test_inexpressible_process_is_one_line(proc, what):
    with pytest.raises(ConfigError) as e:
        TrigFlow(proc, 0.5)
    msg = str(e.value)
    assert e.value.field == "teacher.process" and msg.startswith("teacher.process: ")
    assert what in msg and "\n" not in msg


def test_every_builtin_process_is_expressible():
    for p in PROCESSES.values():
        check_expressible(p)  # raises otherwise


def test_bad_sigma_data():
    with pytest.raises(ConfigError, match="objective.sigma_data"):
        TrigFlow(EDM(), 0.0)
