"""Multi-step samplers for any :class:`~scoredistill.models.denoiser.Denoiser` (k-diffusion style).

All samplers integrate the probability-flow ODE in the VE-equivalent coordinates
``y = x_t / a_t`` and ``rho = s_t / a_t`` where it reads ``dy/drho = (y - D(x_t, t)) / rho``
(arXiv 2206.00364 eq. 3), so they serve VP, EDM and flow teachers unchanged. DDIM is exactly the
Euler step of this ODE (arXiv 2010.02502, 2206.00364 §3).
"""

from __future__ import annotations

import torch

from scoredistill.models.denoiser import Denoiser, module_device


def get_rhos_karras(n: int, rho_min: float, rho_max: float, power: float = 7.0) -> torch.Tensor:
    """Karras et al. noise levels, ``n`` values from ``rho_max`` down to ``rho_min``, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = rho_min ** (1 / power), rho_max ** (1 / power)
    rhos = (hi + ramp * (lo - hi)) ** power
    return torch.cat([rhos, rhos.new_zeros(1)])


def get_rhos_uniform_t(n: int, denoiser: Denoiser, t_min: float | None = None, t_max: float | None = None):
    """Noise levels at ``n`` canonical times evenly spaced from ``t_max`` to ``t_min`` (DDIM spacing)."""
    p = denoiser.process
    ts = torch.linspace(t_max if t_max is not None else p.t_max, t_min if t_min is not None else p.t_min,
                        n, dtype=torch.float64)
    return torch.cat([p.rho(ts), torch.zeros(1, dtype=torch.float64)])


def _levels(denoiser: Denoiser, y: torch.Tensor, rhos: list[float]) -> list:
    """``(t, a_t)`` of every noise level, computed once per level (the samplers used to map ``rho``
    back to canonical time at each evaluation, twice per level for Heun): ``t`` expanded to the batch
    on ``y``'s device, ``a_t`` shaped to broadcast against ``y``."""
    p = denoiser.process
    out = []
    for rho in rhos:
        t = p.t_from_rho(torch.tensor(rho, dtype=torch.float64)).expand(y.shape[0]).to(y.device)
        out.append((t, p.alpha(t).view((-1,) + (1,) * (y.dim() - 1)).to(y.dtype)))
    return out


def _denoise_y(denoiser: Denoiser, y: torch.Tensor, level, cond, w: float) -> torch.Tensor:
    t, a = level
    return denoiser.guided(a * y, t, cond, w)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, z: torch.Tensor, rhos: torch.Tensor, cond=None, w: float = 1.0) -> torch.Tensor:
    """Euler on the PF-ODE from ``y = rho_0 z``; returns ``x0`` (the ``y`` at ``rho = 0``)."""
    return _pf_ode(denoiser, z, rhos, cond, w, heun=False)


@torch.no_grad()
def sample_heun(denoiser: Denoiser, z: torch.Tensor, rhos: torch.Tensor, cond=None, w: float = 1.0) -> torch.Tensor:
    """EDM Heun (arXiv 2206.00364 Alg. 1, deterministic): ``2n - 1`` evaluations for ``n`` levels."""
    return _pf_ode(denoiser, z, rhos, cond, w, heun=True)


def _pf_ode(denoiser: Denoiser, z: torch.Tensor, rhos: torch.Tensor, cond, w: float, heun: bool) -> torch.Tensor:
    """Euler steps ``y += (rho' - rho) (y - D(y)) / rho`` over the levels, each with Heun's second-order
    correction (except onto ``rho = 0``) when ``heun``."""
    rs = [float(r) for r in rhos]
    y = z * rs[0]
    lv = _levels(denoiser, y, rs)
    for i in range(len(rs) - 1):
        r, r_next = rs[i], rs[i + 1]
        d = (y - _denoise_y(denoiser, y, lv[i], cond, w)) / r
        y_next = y + (r_next - r) * d
        if heun and r_next > 0:
            d2 = (y_next - _denoise_y(denoiser, y_next, lv[i + 1], cond, w)) / r_next
            y_next = y + (r_next - r) * 0.5 * (d + d2)
        y = y_next
    return y


def sample_ddim(denoiser: Denoiser, z: torch.Tensor, steps: int, cond=None, w: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM with ``steps`` evaluations at evenly spaced canonical times."""
    return sample_euler(denoiser, z, get_rhos_uniform_t(steps, denoiser), cond, w)


SAMPLERS = ("heun", "euler", "ddim")


def teacher_sample(denoiser: Denoiser, n: int, steps: int = 18, sampler: str = "heun", cond=None, w: float = 1.0,
                   generator: torch.Generator | None = None, rho_min: float | None = None,
                   rho_max: float | None = None, batch_size: int = 4096,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``n`` samples. ``heun``/``euler`` use ``steps`` Karras levels (Heun: ``2 steps - 1`` NFE);
    ``ddim`` uses ``steps`` evaluations. Noise range defaults to the process's, capped to EDM's
    [0.002, 80]. ``device``: where the denoiser runs (default: the device of its parameters/buffers);
    noise is drawn on the CPU from ``generator`` (samples match across devices up to float error), and
    samples of a denoiser run off the CPU are returned on the CPU."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    p = denoiser.process
    rmin = rho_min if rho_min is not None else max(p.rho_min, 0.002)
    rmax = rho_max if rho_max is not None else min(p.rho_max, 80.0)
    device = torch.device(device) if device is not None else module_device(denoiser)
    on_cpu = device.type == "cpu"
    out = []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        z = torch.randn(m, *denoiser.data_shape, generator=generator)
        c = cond[i:i + m] if torch.is_tensor(cond) else cond
        if not on_cpu:
            z = z.to(device)
            c = c.to(device) if torch.is_tensor(c) else c
        if sampler == "ddim":
            t_max = float(p.t_from_rho(rmax))
            rhos = get_rhos_uniform_t(steps, denoiser, t_min=float(p.t_from_rho(rmin)), t_max=t_max)
            out.append(sample_euler(denoiser, z, rhos, c, w))
        else:
            rhos = get_rhos_karras(steps, rmin, rmax)
            fn = sample_heun if sampler == "heun" else sample_euler
            out.append(fn(denoiser, z, rhos, c, w))
    x = torch.cat(out)
    return x if on_cpu else x.cpu()


def nfe(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps
