"""iCT: improved consistency training from data, no teacher (arXiv 2310.14189; docs/objectives/ict.md).

Both points of a pair share one noise draw: ``x_i = x0 + rho_i eps`` and ``x_{i+1} = x0 + rho_{i+1} eps``
(VE levels, written in the teacher's process as ``a_t (x0 + rho eps)``), so ``x_i`` plays the part of the
teacher's ODE step. The loss is

    L = lambda(rho_i) d( f_theta(x_{i+1}, t_{i+1}), sg f_theta(x_i, t_i) ),   lambda = 1/(rho_{i+1} - rho_i),

``d`` the pseudo-Huber distance ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)``; the target is
the student itself (``target_ema: 0``, no EMA). The ``N(k)`` Karras levels follow the doubling curriculum
``N(k) = min(s0 2^floor(k/K'), s1) + 1``, ``K' = floor(K/(log2 floor(s1/s0) + 1))`` over
``K = curriculum_steps`` generator updates, and the pair index is drawn with probability proportional to the
lognormal mass ``N(P_mean, P_std^2)`` of ``ln rho`` between the two levels. The teacher is not read
(only its process and, for ``train.real_data: teacher``, its samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.cd import distance, noised
from scoredistill.objectives.consistency import ConsistencyObjective, KarrasParams


@dataclass
class ICTParams(KarrasParams):
    s0: int = 10
    s1: int = 1280
    curriculum_steps: int = 400000  # K: iterations over which the levels double from s0 + 1 to s1 + 1
    p_mean: float = -1.1
    p_std: float = 2.0

    def validate(self):
        super().validate()
        if not 1 <= self.s0 <= self.s1:
            raise ConfigError("objective.s0", f"need 1 <= s0 <= s1, got {self.s0!r}, {self.s1!r}")
        if self.curriculum_steps < 1 or self.p_std <= 0:
            raise ConfigError("objective.curriculum_steps", "must be >= 1 (and p_std > 0)")


@register
class ICT(ConsistencyObjective):
    """No teacher network: the pair's lower point shares the upper point's noise, and the levels follow the
    curriculum (module docstring)."""

    name = "ict"
    Params = ICTParams

    def generator_loss(self, batch, roles):
        student, target, x0, cond, eps = self.inputs(batch, roles)
        p = roles.teacher.process
        n_levels = cc.ict_num_levels(batch.step, self.p.curriculum_steps, self.p.s0, self.p.s1)
        levels = self.levels(p, n_levels)
        i = cc.sample_pair_indices(len(x0), levels, self.p.p_mean, self.p.p_std, generator=batch.rng)
        t_hi, t_lo = self.pair_times(p, levels, i, x0.device)
        with torch.no_grad():
            tgt = target(noised(p, x0, eps, t_lo), t_lo, cond)
        d = distance("huber", student(noised(p, x0, eps, t_hi), t_hi, cond), tgt)
        lam = cc.pair_weight(levels, i).to(d.device)
        return {"loss": (lam * d).mean(), "ict/distance": d.mean().detach(), "ict/levels": torch.tensor(n_levels)}
