"""TBCM: image-free consistency distillation on the teacher's own sampling trajectories
(Trajectory-Backward Consistency Model, arXiv 2511.20410; docs/objectives/tbcm.md).

No real samples are read. Per micro-batch, ``M = ceil(B/P)`` trajectories start from noise,
``x_{N-1} = a_T rho_{N-1} z`` (``z ~ N(0, I)``, the samplers' start), and the (guided) teacher's PF-ODE carries
each down the ``N``-level Karras grid ``rho_0 < ... < rho_{N-1}`` of :mod:`.cd` (Heun, or Euler = DDIM); ``P``
pair indices ``n`` are drawn uniformly per trajectory (``points_per_trajectory``), so the training points
``x_{n+1}`` are the states the teacher actually visits when it samples, not forward-noised data. The pair's lower
point ``x_n`` is the same trajectory one level down -- exactly CD's teacher step from ``x_{n+1}`` -- and the loss
is CD's:

    L = d( f_theta(x_{n+1}, t_{n+1}), sg f^-(x_n, t_n) ).

The paper distils in continuous time (sCM-style); this is the discrete-time form of the same pairing. The cost
is one full teacher trajectory (``N - 1`` ODE steps) per ``P`` samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.cd import CD, CDParams, distance
from scoredistill.objectives.consistency import check_ranges


@dataclass
class TBCMParams(CDParams):
    points_per_trajectory: int = 4  # P: training pairs drawn from each teacher trajectory

    def validate(self):
        super().validate()
        check_ranges(self, {"points_per_trajectory": (self.points_per_trajectory >= 1, ">= 1")})


@torch.no_grad()
def teacher_trajectory(teacher, z: torch.Tensor, levels: torch.Tensor, solver: str = "heun", cond=None,
                       w: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's PF-ODE trajectory from noise ``z`` over ascending ``levels``: ``(xs, times)`` with ``xs[i]``
    the state at level ``i`` (shape ``(N,) + z.shape``, ``xs[N-1] = a_T rho_{N-1} z``) and ``times[i] = t(rho_i)``."""
    p = teacher.process
    times = cc.level_times(p, levels).to(z.device)
    x = (p.alpha(times[-1]) * levels[-1]).to(z.dtype) * z
    xs = [x]
    for i in range(len(levels) - 1, 0, -1):
        x = cc.teacher_ode_step(teacher, x, times[i], times[i - 1], solver, cond, w)
        xs.append(x)
    return torch.stack(xs[::-1]), times


def trajectory_pairs(xs: torch.Tensor, times: torch.Tensor, n: torch.Tensor):
    """``(x_hi, t_hi, x_lo, t_lo)`` of pair indices ``n`` (shape ``(M, P)``): trajectory ``m``'s states at levels
    ``n + 1`` and ``n``, flattened trajectory-major (``M P`` samples)."""
    m = torch.arange(xs.shape[1], device=n.device)[:, None].expand_as(n).reshape(-1)
    n = n.reshape(-1)
    return xs[n + 1, m], times[n + 1], xs[n, m], times[n]


@register
class TBCM(CD):
    """CD's loss on pairs taken from the teacher's trajectories from noise (module docstring)."""

    name = "tbcm"
    Params = TBCMParams

    def requirements(self) -> set[str]:
        return {"consistency_target"}

    def generator_loss(self, batch, roles):
        student, target, teacher = roles.student, roles.target, roles.teacher
        if student is None or target is None:
            raise ValueError("tbcm needs Roles.student and Roles.target (the consistency_target requirement)")
        p = teacher.process
        b, P = batch.x.shape[0], int(self.p.points_per_trajectory)
        m = math.ceil(b / P)
        z = torch.randn((m,) + tuple(batch.x.shape[1:]), generator=batch.rng).to(batch.x.device)
        cond = batch.cond
        tcond = None if cond is None else cond[torch.arange(m) * P % b]
        levels = self.levels(p, self.p.levels)
        xs, times = teacher_trajectory(teacher, z, levels, self.p.solver, tcond, self.p.guidance_scale)
        n = torch.randint(0, len(levels) - 1, (m, P), generator=batch.rng).to(z.device)
        x_hi, t_hi, x_lo, t_lo = (v[:b] for v in trajectory_pairs(xs, times, n))
        pcond = None if tcond is None else tcond.repeat_interleave(P)[:b]
        with torch.no_grad():
            tgt = target(x_lo, t_lo, pcond)
        d = distance(self.p.distance, student(x_hi, t_hi, pcond), tgt)
        return {"loss": d.mean(), "cd/distance": d.mean().detach(), "tbcm/trajectories": torch.tensor(m)}
