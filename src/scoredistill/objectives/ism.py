"""ISM — Interval Score Matching (LucidDreamer, arXiv 2311.11284) and TSM — Trajectory Score Matching
(Dreamer XL, arXiv 2405.11252); docs/optimize/ism.md and docs/optimize/tsm.md. Both share
:func:`ddim_invert`.

ISM: ``g = (s_t / a_t) [eps^w_real(x_t, t, c) - eps_real(x_s, s, null)]`` with ``s = t - delta`` and
``x_s``, ``x_t`` obtained by deterministic, unconditional DDIM inversion of ``x``:

1. ``x_s``: noise ``x`` at ``t_0 = max(s - xs_delta_t * xs_inv_steps, t_min)`` with the sampled noise,
   then invert ``t_0 -> s`` in at most ``xs_inv_steps`` DDIM steps of stride ``xs_delta_t`` (last clipped);
2. ``x_t``: one more inversion step ``s -> t``. The target ``eps_real(x_s, s, null)`` is the prediction
   that step makes at ``x_s`` (official ``pred_scores[0]``).

TSM: the target is taken at ``mu = s + (t - s) sqrt(1 - gamma^2)`` on a second one-step path
``x_s -> x_mu``: ``g = (s_t/a_t)[eps^w_real(x_t, t, c) - eps_real(x_mu, mu, null)]``, while ``x_t`` is
still the one-step inversion ``x_s -> x_t``. Default ``gamma = 0.3``.

Times are canonical (``t = n / 1000`` for the library's DDPM process, so the official integer defaults
``delta_t 80, delta_t_start 100, xs_delta_t 200`` read ``0.08, 0.1, 0.2``). **One t per batch**
(official). Interval annealing: ``delta = delta_t + r (delta_t_start - delta_t)``; upper time bound
``t_max + r (max_t_range - t_max)`` with ``r = 1 - min(step / warmup_iter, 1)`` (so 0.98 -> 0.5 over the
warm-up with the default ``time: {t_min: 0.02, t_max: 0.5}``). Official noise is
``N(0, I) + 0.1 N(0, I)`` per-channel offset (one offset per channel shared over the batch and the
spatial dimensions); ``noise_offset`` applies it to data with spatial dimensions (``(B, C, H, ...)``)
and is ignored for flat vectors. Inversion uses no CFG (``denoise_guidance_scale = 1``) and eta 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.common import noise_like
from scoredistill.objectives.core import (
    FieldObjective,
    clamp_key,
    eps_of,
    field_diag,
    finish_field,
    null_like,
    score_field,
)
from scoredistill.process.time import Uniform


def ddim_step(process, x: torch.Tensor, eps: torch.Tensor, t_from: torch.Tensor,
              t_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) from ``t_from`` to ``t_to`` (either direction):
    ``x0 = (x - s eps) / a``, ``x' = a' x0 + s' eps`` (float64 inside; the PF-ODE Euler step)."""
    a, s = process.coeffs(t_from, x)
    a2, s2 = process.coeffs(t_to, x)
    e = eps.double()
    x0 = (x.double() - s * e) / a
    return (a2 * x0 + s2 * e).to(x.dtype)


@torch.no_grad()
def ddim_invert(net, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, stride: float, max_steps: int,
                cond=None, w: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """DDIM inversion of the noisy sample ``x`` (at ``t_from``) toward ``t_to``: at most ``max_steps``
    steps of ``stride`` in canonical time, the last one clipped to ``t_to`` (LucidDreamer
    ``add_noise_with_cfg``). Returns ``(x_reached, t_reached, eps_predictions)``, the predictions in the
    order they were made (the first at ``(x, t_from)``)."""
    p = net.process
    cur = t_from.to(torch.float64)
    t_to = t_to.to(torch.float64)
    preds = []
    for _ in range(max(int(max_steps), 1)):
        e = eps_of(net, x, cur, cond, w)
        preds.append(e)
        nxt = torch.minimum(cur + stride, t_to)
        x = ddim_step(p, x, e, cur, nxt)
        cur = nxt
        if bool((cur >= t_to).all()):
            break
    return x, cur, preds


def offset_noise(x: torch.Tensor, rng, scale: float) -> torch.Tensor:
    """``N(0, I)`` plus, for data with spatial dimensions, ``scale`` times one Gaussian offset per
    channel broadcast over the batch and the spatial dimensions (LucidDreamer)."""
    eps = noise_like(x, rng)
    if scale and x.dim() >= 3:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        eps = eps + scale * torch.randn(shape, generator=rng, dtype=x.dtype).to(x.device)
    return eps


@dataclass
class ISMParams(ObjectiveParams):
    guidance_scale: float = 7.5
    delta_t: float = key(0.08, "interval s = t - delta_t in canonical time (official default 80 steps; "
                         "configs use 25)", lo=0, hi=1)
    delta_t_start: float = key(0.1, "interval at step 0, annealed to delta_t over warmup_iter", lo=0, hi=1)
    xs_delta_t: float = key(0.2, "stride of the x_s inversion (canonical time)", lo=0, hi=1, lo_open=True)
    xs_inv_steps: int = key(5, "DDIM inversion steps to x_s", lo=1)
    warmup_iter: int = key(1500, "steps of the interval and time-bound annealing", lo=0, unit="steps")
    max_t_range: float = key(0.98, "upper time bound at step 0 (annealed to time.t_max)", lo=0, hi=1)
    noise_offset: float = key(0.1, "std of the per-channel noise offset (data with spatial dimensions)")
    grad_clamp: float | None = clamp_key()


@register
class ISM(FieldObjective):
    name = "ism"
    Params = ISMParams
    default_time = Uniform(t_min=0.02, t_max=0.5, per_batch=True)

    def warm_up_rate(self, step: int) -> float:
        return 1.0 - min(step / self.p.warmup_iter, 1.0) if self.p.warmup_iter > 0 else 0.0

    def times(self, batch, process) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.warm_up_rate(batch.step)
        sampler = self.time
        if hasattr(sampler, "t_max") and self.p.max_t_range > sampler.t_max:
            t_hi = sampler.t_max + r * (self.p.max_t_range - sampler.t_max)
            sampler = dataclasses.replace(sampler, t_max=t_hi)
        t = self.sample_t(batch, process, sampler)
        delta = self.p.delta_t + r * (self.p.delta_t_start - self.p.delta_t)
        s = (t - delta).clamp(min=process.t_min)
        return t, s

    def invert_to_s(self, batch, roles, x, s):
        """Steps 1 of the official inversion: ``x_s`` from ``x`` by DDIM inversion (unconditional)."""
        p = roles.process
        eps = offset_noise(x, batch.rng, self.p.noise_offset)
        t0 = (s - self.p.xs_delta_t * self.p.xs_inv_steps).clamp(min=p.t_min)
        x0 = p.add_noise(x, eps, t0)
        null = null_like(batch.cond)
        x_s, _, _ = ddim_invert(roles.teacher, x0, t0, s, self.p.xs_delta_t, self.p.xs_inv_steps, null)
        return x_s, null

    def target(self, roles, x_s, e_s, s, t, null):
        return e_s

    def field(self, batch, roles):
        x = batch.x.detach()
        p = roles.process
        t, s = self.times(batch, p)
        x_s, null = self.invert_to_s(batch, roles, x, s)
        e_s = eps_of(roles.teacher, x_s, s, null)           # first prediction of the s -> t step
        x_t = ddim_step(p, x_s, e_s, s, t)
        e_real = eps_of(roles.teacher, x_t, t, batch.cond, self.p.guidance_scale)
        tgt = self.target(roles, x_s, e_s, s, t, null)
        a, sig = p.coeffs(t, x)
        # LucidDreamer's w(t) = sqrt((1 - alpha_bar) / alpha_bar) = s_t / a_t: the x0 weighting
        g = finish_field(score_field("x0", a, sig, e_real, tgt, "eps"), self.p.grad_clamp)
        return g, field_diag(g, t, interval=t - s)


@dataclass
class TSMParams(ISMParams):
    gamma: float = key(0.3, "TSM: the target's time mu = s + (t - s) sqrt(1 - gamma^2)", lo=0, hi=1)


@register
class TSM(ISM):
    name = "tsm"
    Params = TSMParams

    def target(self, roles, x_s, e_s, s, t, null):
        p = roles.process
        mu = s + (t - s) * (1.0 - self.p.gamma**2) ** 0.5
        grid = getattr(self.time, "discrete", None)
        if grid:  # the official mu = round(...) on the integer grid
            mu = torch.round(mu * grid) / grid
        x_mu = ddim_step(p, x_s, e_s, s, mu)
        return eps_of(roles.teacher, x_mu, mu, null)
