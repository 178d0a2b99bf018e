"""BSD — Balanced Score Distillation (PlacidDreamer, arXiv 2407.13976; docs/optimize/bsd.md).

Two directions at ``x_t = a_t x + s_t eps``: classifier ``g_c = k_c (eps_c - eps_u)`` and denoising
``g_d = k_d eps_u``, mixed per sample by the min-norm (MGDA / Pareto) weight
``alpha = clip(<g_d - g_c, g_d> / ||g_d - g_c||^2, 0, 1)``, the minimiser of
``||alpha g_c + (1 - alpha) g_d||`` over ``alpha in [0, 1]``; field
``g = sqrt(alpha_bar_t) (alpha g_c + (1 - alpha) g_d) = a_t (...)``.
Defaults are the 3D code's ``k_c = 15, k_d = 1``; the official 2-D demo uses ``k_c = 1, k_d = 0.018``.
Times inherit LucidDreamer (``t in [0.02, 0.5]``, the upper bound warmed up from 0.98: schedule
``time.t_max``). The "auto" variant of the code (``g_d = 1.25 (eps_u - eps)`` with a norm-based weight)
is not implemented. Needs a conditional teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.core import ClassFieldObjective, clamp_key, eps_of, field_diag, finish_field, null_like
from scoredistill.process.time import Uniform


def min_norm_alpha(g_c: torch.Tensor, g_d: torch.Tensor) -> torch.Tensor:
    """Per-sample ``clip(<g_d - g_c, g_d> / ||g_d - g_c||^2, 0, 1)``, shaped for broadcasting."""
    diff = (g_d - g_c).flatten(1)
    num = (diff * g_d.flatten(1)).sum(1)
    den = (diff * diff).sum(1)
    alpha = torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num)).clamp(0.0, 1.0)
    return alpha.view((-1,) + (1,) * (g_c.dim() - 1))


@dataclass
class BSDParams(ObjectiveParams):
    k_c: float = key(15.0, "weight of the class direction g_c = k_c (eps_c - eps_u)", lo=0)
    k_d: float = key(1.0, "weight of the unconditional direction g_d = k_d eps_u", lo=0)
    grad_clamp: float | None = clamp_key()


@register
class BSD(ClassFieldObjective):
    name = "bsd"
    Params = BSDParams
    default_time = Uniform(t_min=0.02, t_max=0.5)

    def field(self, batch, roles):
        p = roles.process
        x, t, _, x_t = self.noised(batch, p)
        e_c = eps_of(roles.teacher, x_t, t, batch.cond)
        e_u = eps_of(roles.teacher, x_t, t, null_like(batch.cond))
        g_c = self.p.k_c * (e_c - e_u)
        g_d = self.p.k_d * e_u
        alpha = min_norm_alpha(g_c, g_d)
        a, _ = p.coeffs(t, x)
        g = finish_field(a * (alpha * g_c + (1 - alpha) * g_d), self.p.grad_clamp)
        return g, field_diag(g, t, alpha=alpha)
