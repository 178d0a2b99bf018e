"""CD: consistency distillation with a teacher ODE step between adjacent Karras levels
(arXiv 2303.01469; docs/objectives/cd.md).

A pair index ``n`` is drawn uniformly from the ``N`` Karras levels ``rho_0 < ... < rho_{N-1}`` (EDM's
grid, ``rho`` the VE noise level of the teacher's process); a real sample is noised to level
``rho_{n+1}``, one step of the (guided) teacher's PF-ODE (Heun, or Euler = DDIM) carries it to
``rho_n``, and the student is pulled toward the target network there:

    L = d( f_theta(x_{n+1}, t_{n+1}), sg f^-(x_hat_n, t_n) ),

``d`` the squared L2 distance per element (``distance: l2``) or iCT's pseudo-Huber (``huber``), ``f^-``
an EMA of the student (``target_ema``, 0.95 by default as in CD's CIFAR-10 runs) or the student itself
(``target_ema: 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.consistency import ConsistencyObjective, KarrasParams

DISTANCES = ("l2", "huber")


@dataclass
class CDParams(KarrasParams):
    target_ema: float = 0.95
    levels: int = 18             # N Karras levels (CD's CIFAR-10 setting)
    solver: str = "heun"         # heun | euler | ddim (the teacher's ODE step between adjacent levels)
    distance: str = "l2"         # l2 | huber (c = 0.00054 sqrt(dim))

    def validate(self):
        super().validate()
        if self.solver not in cc.ODE_SOLVERS:
            raise ConfigError("objective.solver", f"unknown value {self.solver!r}; accepted: "
                              f"{', '.join(cc.ODE_SOLVERS)}")
        if self.distance not in DISTANCES:
            raise ConfigError("objective.distance", f"unknown value {self.distance!r}; accepted: "
                              f"{', '.join(DISTANCES)}")
        if self.levels < 2:
            raise ConfigError("objective.levels", f"must be >= 2, got {self.levels!r}")


def distance(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample distance: mean squared error (``l2``) or iCT's pseudo-Huber with ``c = 0.00054 sqrt(dim)``."""
    if kind == "huber":
        return cc.pseudo_huber(a.double(), b.double(), cc.ict_huber_c(a[0].numel()))
    return (a.double() - b.double()).reshape(len(a), -1).pow(2).mean(1)


def noised(process, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = a_t x0 + s_t eps`` per sample, in ``x0``'s dtype."""
    return process.add_noise(x0, eps, t).to(x0.dtype)


@register
class CD(ConsistencyObjective):
    """The teacher's ODE step supplies the lower point of each pair (module docstring)."""

    name = "cd"
    Params = CDParams

    def pairs(self, batch, roles):
        """CD's training pairs: ``(student, target, cond, levels, n, t_hi, x_hi, t_lo, x_lo)`` with ``n`` uniform,
        ``x_hi`` a real sample noised to level ``n + 1`` and ``x_lo`` the teacher's ODE step from it to level ``n``."""
        student, target, x0, cond, eps = self.inputs(batch, roles)
        teacher, p = roles.teacher, roles.teacher.process
        levels = self.levels(p, self.p.levels)
        n = torch.randint(0, len(levels) - 1, (len(x0),), generator=batch.rng)
        t_hi, t_lo = self.pair_times(p, levels, n, x0.device)
        x_hi = noised(p, x0, eps, t_hi)
        x_lo = cc.teacher_ode_step(teacher, x_hi, t_hi, t_lo, self.p.solver, cond, self.p.guidance_scale)
        return student, target, cond, levels, n, t_hi, x_hi, t_lo, x_lo

    def generator_loss(self, batch, roles):
        student, target, cond, _, _, t_hi, x_hi, t_lo, x_lo = self.pairs(batch, roles)
        with torch.no_grad():
            tgt = target(x_lo, t_lo, cond)
        d = distance(self.p.distance, student(x_hi, t_hi, cond), tgt)
        return {"loss": d.mean(), "cd/distance": d.mean().detach()}
