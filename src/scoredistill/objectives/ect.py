"""ECT: easy consistency tuning, continuous-time consistency training from data (arXiv 2406.14548;
docs/objectives/ect.md). FastGen ships it as "CM".

Per sample a VE level ``rho_t`` is drawn with ``ln rho_t ~ N(P_mean, P_std^2)`` (clamped to the grid ends) and
mapped to a lower level ``rho_r = r(rho_t, stage) < rho_t`` (:func:`.consistency_core.ect_rho_r`); both points
share one noise draw, ``x_t = a (x0 + rho_t eps)`` and ``x_r = a (x0 + rho_r eps)``, so ``x_r`` stands in for
the teacher's ODE step (no teacher network is evaluated). The loss is

    L = d( f_theta(x_t, t), sg f_theta(x_r, r) ) / (rho_t - rho_r),   d(a, b) = sqrt(||a - b||^2 + c^2) - c,

with the target ``x0`` itself where ``rho_r`` falls below ``rho_min`` (the boundary ``f(x, 0) = x``). ``d`` is
the L2 norm for ``c = 0`` (the paper's default): an adaptive weight ``1/||a - b||`` on the squared error. The
stage is ``floor(step / stage_steps)``; each stage divides the gap ``(rho_t - rho_r)/rho_t`` by ``q``, so
training moves from denoising (at stage 0 ``r = 0`` for every ``rho_t <= ln 7 ~ 1.95`` with the defaults)
toward the continuous-time limit ``dt -> 0``. ECT tunes a pretrained diffusion model; here the student can
start as the teacher's denoiser through teacher score matching (``generator.init_steps``, the engine resets the
target to the initialised student) or as a copy of a learned teacher (``generator.kind: teacher``), or fresh
(the toy recipe). The target is the student itself (``target_ema: 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.cd import noised
from scoredistill.objectives.consistency import ConsistencyObjective, KarrasParams


@dataclass
class ECTParams(KarrasParams):
    p_mean: float = -1.1     # lognormal of rho_t (ECT's CIFAR-10 setting, as iCT)
    p_std: float = 2.0
    q: float = 2.0           # the gap t - r shrinks by q per stage
    k: float = 8.0           # sigmoid mapping: (t - r)/t = q^-(stage+1) (1 + k sigmoid(-b t))
    b: float = 1.0
    stage_steps: int = 25000  # iterations per stage (ECT's CIFAR-10 run: 25k iterations of batch 128, 8 stages)
    huber_c: float = 0.0     # pseudo-Huber constant of the distance; 0: the L2 norm

    def validate(self):
        super().validate()
        checks = (("p_mean", math.isfinite(self.p_mean), "a finite number"),
                  ("p_std", 0 < self.p_std < math.inf, "a finite number > 0"),
                  ("q", 1 < self.q < math.inf, "a finite number > 1"),
                  ("k", 0 <= self.k < math.inf, "a finite number >= 0"),
                  ("b", 0 < self.b < math.inf, "a finite number > 0"),
                  ("stage_steps", self.stage_steps >= 1, "an integer >= 1"),
                  ("huber_c", 0 <= self.huber_c < math.inf, "a finite number >= 0"))
        for key, ok, accepted in checks:
            if not ok:
                raise ConfigError(f"objective.{key}", f"got {getattr(self, key)!r}; accepted: {accepted}")


@dataclass
class ECTPairs:
    """One batch of ECT pairs: VE levels ``rho_t > rho_r``, canonical times, the shared-noise points ``x_t``,
    ``x_r`` and ``boundary`` (``rho_r < rho_min``: the target is ``x0``)."""

    stage: int
    rho_t: torch.Tensor
    rho_r: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    x_t: torch.Tensor
    x_r: torch.Tensor
    boundary: torch.Tensor


@register
class ECT(ConsistencyObjective):
    """No teacher network: the lower point shares the upper point's noise, ``r(t)`` follows the stage (module
    docstring)."""

    name = "ect"
    Params = ECTParams

    def pairs(self, batch, roles):
        """``(student, target, x0, cond, ECTPairs)`` of one micro-batch (random draws from ``batch.rng``)."""
        student, target, x0, cond, eps = self.inputs(batch, roles)
        p = roles.teacher.process
        lo, hi = max(self.p.rho_min, p.rho_min), min(self.p.rho_max, p.rho_max)
        stage = cc.ect_stage(batch.step, self.p.stage_steps)
        rho_t = cc.sample_lognormal_levels(len(x0), self.p.p_mean, self.p.p_std, lo, hi, generator=batch.rng)
        rho_r = cc.ect_rho_r(rho_t, stage, self.p.q, self.p.k, self.p.b)
        t, r = p.t_from_rho(rho_t).to(x0.device), p.t_from_rho(rho_r.clamp(min=lo)).to(x0.device)
        pairs = ECTPairs(stage, rho_t, rho_r, t, r, noised(p, x0, eps, t), noised(p, x0, eps, r),
                         (rho_r < lo).to(x0.device))
        return student, target, x0, cond, pairs

    def generator_loss(self, batch, roles):
        student, target, x0, cond, pr = self.pairs(batch, roles)
        with torch.no_grad():
            tgt = target(pr.x_r, pr.r, cond)
            tgt = torch.where(pr.boundary.reshape((-1,) + (1,) * (x0.dim() - 1)), x0, tgt.to(x0.dtype))
        d = cc.pseudo_huber(student(pr.x_t, pr.t, cond).double(), tgt.double(), self.p.huber_c)
        w = (1.0 / (pr.rho_t - pr.rho_r)).to(d.device)
        return {"loss": (w * d).mean(), "ect/distance": d.mean().detach(), "ect/stage": torch.tensor(pr.stage),
                "ect/boundary_fraction": pr.boundary.double().mean(),
                "ect/gap": ((pr.rho_t - pr.rho_r) / pr.rho_t).mean()}
