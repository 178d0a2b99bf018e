"""Hyper-SD: trajectory-segmented consistency distillation with a progressive schedule of segments
(arXiv 2404.13686; docs/objectives/hypersd.md).

The ``N``-level Karras grid of :mod:`.cd` (indices ``0 .. N-1``, ascending noise) is cut into ``k`` segments of
equal index length, boundaries ``b_j = round(j (N-1)/k)``. A pair ``(n+1, n)`` belongs to the segment whose start
``s = max{b_j <= n}`` lies at or below its lower point, and consistency is enforced only within it: the student
maps ``x_{n+1}`` to the segment start by one DDIM jump with its own ``x0`` prediction, the target maps the
teacher's ODE step ``x_hat_n`` there the same way,

    J_net(x, t -> s) = D + (rho_s/rho_t) (y - D),    y = x/a_t, D = net(x, t)    (VE coordinates),
    L = d( J_theta(x_{n+1}, t_{n+1} -> s), sg J^-(x_hat_n, t_n -> s) ),     d as in CD (l2 | huber),

with ``J^-(x_hat_s, t_s -> s) = y_s`` itself at the segment start (the boundary condition). With ``k = 1`` the
start is ``rho_0 = rho_min`` and the loss is CD's. ``k`` follows ``segments`` (default 8 -> 4 -> 2 -> 1), each
entry held for ``stage_steps`` generator steps (the last one to the end). The paper's later stages (human
feedback rewards and a score-distillation stage for one step) are out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.cd import CD, CDParams, distance
from scoredistill.objectives.consistency import check_ranges


@dataclass
class HyperSDParams(CDParams):
    segments: list[int] = key([8, 4, 2, 1], "number of segments k per stage (progressive: 8 -> 4 -> 2 -> 1)", lo=1)
    stage_steps: int = 750  # generator steps per entry of segments (the last entry holds to the end)

    def validate(self):
        super().validate()
        check_ranges(self, {"stage_steps": (self.stage_steps >= 1, ">= 1")})
        if max(self.segments) > self.levels - 1:
            raise ConfigError("objective.segments", f"each k must be <= levels - 1 = {self.levels - 1}, "
                              f"got {list(self.segments)}")


def segment_count(step: int, segments, stage_steps: int) -> int:
    """``k`` at generator step ``step``: ``segments[min(step // stage_steps, len - 1)]``."""
    return int(segments[min(step // stage_steps, len(segments) - 1)])


def segment_start(n: torch.Tensor, k: int, num_levels: int) -> torch.Tensor:
    """Grid index of the start of the segment holding pair ``(n+1, n)``: the largest boundary
    ``round(j (N-1)/k) <= n``."""
    bounds = torch.tensor([round(j * (num_levels - 1) / k) for j in range(k + 1)], device=n.device)
    return bounds[(bounds[None, :] <= n[:, None]).sum(1) - 1]


def ddim_jump(net, x: torch.Tensor, t: torch.Tensor, t_s: torch.Tensor, cond=None) -> torch.Tensor:
    """``J(x, t -> s) = D + (rho_s/rho_t)(x/a_t - D)`` in VE coordinates, float64 (the DDIM step of ``net``)."""
    p = net.process
    d = net(x, t, cond).double()
    y = x.double() / cc._col(p.alpha(t), x)
    return d + cc._col(p.rho(t_s) / p.rho(t), x) * (y - d)


@register
class HyperSD(CD):
    """CD restricted to segments of the grid, whose number follows the progressive schedule (module docstring)."""

    name = "hypersd"
    Params = HyperSDParams

    def generator_loss(self, batch, roles):
        student, target, cond, levels, n, t_hi, x_hi, t_lo, x_lo = self.pairs(batch, roles)
        p, dev = roles.teacher.process, x_hi.device
        k = segment_count(batch.step, self.p.segments, self.p.stage_steps)
        s = segment_start(n, k, len(levels))
        t_s = cc.level_times(p, levels)[s].to(dev)
        with torch.no_grad():
            at_start = (n == s).to(dev).reshape((-1,) + (1,) * (x_hi.dim() - 1))
            y_lo = x_lo.double() / cc._col(p.alpha(t_lo), x_lo)
            tgt = torch.where(at_start, y_lo, ddim_jump(target, x_lo, t_lo, t_s, cond))
        d = distance(self.p.distance, ddim_jump(student, x_hi, t_hi, t_s, cond), tgt)
        return {"loss": d.mean(), "cd/distance": d.mean().detach(), "hypersd/segments": torch.tensor(k)}
