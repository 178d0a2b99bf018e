"""ASD — Asynchronous Score Distillation (ScaleDreamer, arXiv 2407.02040; docs/optimize/asd.md).

SDS with the injected noise replaced by the *same* teacher at a later time with the same noise:
``g = w(t) [eps^w_real(x_t, t, c) - eps_real(x_{t+dt}, t+dt, c)]``,
``x_{t+dt} = a_{t+dt} x + s_{t+dt} eps`` (same ``eps``). The second term is conditional **without
CFG** (official ``get_eps``). Time shift (the active ``get_t_plus`` of the official code), in canonical
time: ``dt = plus_ratio (t - t_min)`` clamped to ``[0, t_max_process - t]``, times ``U(0, 1)`` per
sample when ``plus_random``; ``t+ = clamp(t + dt)``. ``t_min`` is the lower bound of the objective's
time sampler (annealed 0.5 -> 0.02 in the official config; schedule it with ``time.t_min``).
When the time sampler is discrete (``discrete: N``) ``dt`` is floored to the grid like the code's
``int(dt)``. Defaults: ``plus_ratio 0.1``, ``plus_random``, canonical guidance 7.5, weighting ``sds``.
The official perp-neg term (weight -0.5, multi-view prompts) is not part of this toy objective.
"""

from __future__ import annotations

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
    score_field,
    weighting_key,
)


@dataclass
class ASDParams(ObjectiveParams):
    guidance_scale: float = 7.5
    weighting: str = weighting_key()
    plus_ratio: float = key(0.1, "the second time t+ = t + plus_ratio (t - t_min) (at most)", lo=0)
    plus_random: bool = key(True, "draw t+ uniformly up to that bound")
    grad_clamp: float | None = clamp_key()


@register
class ASD(FieldObjective):
    name = "asd"
    Params = ASDParams

    def t_plus(self, t: torch.Tensor, process, rng) -> torch.Tensor:
        t_lo = float(getattr(self.time, "t_min", process.t_min))
        dt = (self.p.plus_ratio * (t - t_lo)).clamp(min=0.0)
        dt = torch.minimum(dt, process.t_max - t)
        if self.p.plus_random:
            dt = dt * torch.rand(t.shape, generator=rng, dtype=torch.float64).to(t.device)
        grid = getattr(self.time, "discrete", None)
        if grid:
            dt = torch.floor(dt * grid + 1e-9) / grid
        return (t + dt).clamp(process.t_min, process.t_max)

    def field(self, batch, roles):
        x = batch.x.detach()
        p = roles.process
        t = self.sample_t(batch, p)
        tp = self.t_plus(t, p, batch.rng)
        eps = noise_like(x, batch.rng)
        x_t = p.add_noise(x, eps, t)
        x_tp = p.add_noise(x, eps, tp)
        e_real = eps_of(roles.teacher, x_t, t, batch.cond, self.p.guidance_scale)
        e_plus = eps_of(roles.teacher, x_tp, tp, batch.cond, 1.0)  # conditional, no CFG
        a, s = p.coeffs(t, x)
        g = finish_field(score_field(self.p.weighting, a, s, e_real, e_plus, "eps"), self.p.grad_clamp)
        return g, field_diag(g, t, dt_mean=tp - t)

