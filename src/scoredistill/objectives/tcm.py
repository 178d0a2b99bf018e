"""TCM: truncated consistency distillation, two stages in one run (arXiv 2410.14895; docs/objectives/tcm.md).

**Stage 1** (generator steps ``< stage1_steps``) is CD over the whole range (:mod:`.cd`). At the switch the
engine freezes a copy of the student, ``f_1`` (requirement ``stage_snapshot``), and **stage 2** goes on training
the same student from there, with the consistency map truncated at a dividing level ``rho'`` (``t' = t(rho')``).
Its pairs lie on an ``N``-level Karras grid ``rho' = r_0 < ... < r_{N-1} = rho_max``; per sample one of three
terms is drawn:

* a consistency pair (probability ``1 - boundary_fraction - denoise_fraction``, weight 1): ``n`` uniform,
  ``L = d(f_theta(x_{n+1}, t_{n+1}), sg g(x_hat_n, t_n))`` with ``x_hat_n`` the teacher's ODE step, and
  ``g = f^-`` (the target network) above ``t'`` but ``g = f_1`` **at** ``t'`` (``n = 0``): the frozen stage-1
  network, used as a denoiser, is the boundary condition in place of the identity at ``rho_min``;
* a boundary pair (``boundary_fraction``, weight ``boundary_weight``): the same with ``n = 0``;
* a denoising sample (``denoise_fraction``, weight ``denoise_weight``): ``t`` uniform on ``[t_min, t')``,
  ``L = mean((f_theta(x_t, t) - x0)^2)``, so the student stays a denoiser below ``t'``, where its few-step
  sampler still evaluates it.

The loss is the batch mean of the weighted per-sample terms. Capacity goes to ``t >= t'`` (the hard part of the
map); the easy small-noise part is inherited from stage 1 through ``f_1``. Defaults: FastGen's TCM (NVlabs/FastGen,
EDM: ``t' = sigma 1.0``, boundary probability 0.25 at weight 0.1); the denoising fraction is this library's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.cd import CD, CDParams, distance, noised
from scoredistill.objectives.consistency import check_ranges


@dataclass
class TCMParams(CDParams):
    stage1_steps: int = 2000       # generator steps of stage 1 (CD over the whole range); stage 2 afterwards
    rho_prime: float = 1.0         # dividing VE level rho' (t' = t(rho')); FastGen's EDM sigma 1.0
    boundary_fraction: float = 0.25  # share of stage-2 samples forced onto the boundary pair (n = 0)
    boundary_weight: float = 0.1   # their loss weight
    denoise_fraction: float = 0.2  # share of stage-2 samples trained as a denoiser at t < t'
    denoise_weight: float = 1.0

    def validate(self):
        super().validate()
        check_ranges(self, {
            "stage1_steps": (self.stage1_steps >= 0, ">= 0"),
            "rho_prime": (self.rho_min < self.rho_prime < self.rho_max, f"in (rho_min, rho_max) = ({self.rho_min:g}, "
                          f"{self.rho_max:g})"),
            "boundary_fraction": (0 <= self.boundary_fraction <= 1, "in [0, 1]"),
            "denoise_fraction": (0 <= self.denoise_fraction <= 1 - self.boundary_fraction,
                                 f"in [0, 1 - boundary_fraction] = [0, {1 - self.boundary_fraction:g}]"),
            "boundary_weight": (self.boundary_weight >= 0, ">= 0"),
            "denoise_weight": (self.denoise_weight >= 0, ">= 0")})


def _rows(cond, mask):
    return None if cond is None else cond[mask]


CONSISTENCY, BOUNDARY, DENOISE = 0, 1, 2


@register
class TCM(CD):
    """Stage 1 is :class:`~.cd.CD`; stage 2 the truncated mixture of the module docstring."""

    name = "tcm"
    Params = TCMParams

    def requirements(self) -> set[str]:
        return super().requirements() | {"stage_snapshot"}

    def snapshot_step(self) -> int:
        return int(self.p.stage1_steps)

    def truncated_levels(self, process) -> torch.Tensor:
        """Stage 2's ``N`` ascending Karras levels from ``rho'`` to ``rho_max`` (clipped to the process)."""
        hi = min(self.p.rho_max, process.rho_max)
        return cc.karras_levels(self.p.levels, max(self.p.rho_prime, process.rho_min), hi)

    def generator_loss(self, batch, roles):
        if batch.step < self.p.stage1_steps:
            return {**super().generator_loss(batch, roles), "tcm/stage": torch.tensor(1)}
        if roles.snapshot is None:
            raise ValueError("tcm's second stage needs Roles.snapshot (the engine builds it for stage_snapshot)")
        student, target, x0, cond, eps = self.inputs(batch, roles)
        teacher, p = roles.teacher, roles.teacher.process
        levels = self.truncated_levels(p)
        n_b, dev = len(x0), x0.device
        u = torch.rand(n_b, generator=batch.rng, dtype=torch.float64)
        kind = torch.full((n_b,), CONSISTENCY)
        kind[u < self.p.boundary_fraction] = BOUNDARY
        kind[(u >= self.p.boundary_fraction) & (u < self.p.boundary_fraction + self.p.denoise_fraction)] = DENOISE
        n = torch.randint(0, len(levels) - 1, (n_b,), generator=batch.rng)
        n[kind == BOUNDARY] = 0
        t_hi, t_lo = self.pair_times(p, levels, n, dev)
        t_prime = float(cc.level_times(p, levels)[0])
        t_den = cc.tcm_sample_times(n_b, p, t_prime, 1.0, generator=batch.rng).to(dev)
        den = (kind == DENOISE).to(dev)
        t_in = torch.where(den, t_den, t_hi)
        x_in = noised(p, x0, eps, t_in)
        out = student(x_in, t_in, cond)
        per = torch.zeros(n_b, dtype=torch.float64, device=dev)
        if den.any():
            per[den] = distance("l2", out[den], x0[den])
        pair = ~den
        if pair.any():
            c_pair = _rows(cond, pair)
            x_lo = cc.teacher_ode_step(teacher, x_in[pair], t_hi[pair], t_lo[pair], self.p.solver, c_pair,
                                       self.p.guidance_scale)
            at = t_lo[pair] <= t_prime
            with torch.no_grad():
                tgt = cc.tcm_pair_target(x_lo, t_lo[pair], t_prime,
                                         lambda x, s: target(x, s, _rows(c_pair, ~at)),
                                         lambda x, s: roles.snapshot(x, s, _rows(c_pair, at)))
            per[pair] = distance(self.p.distance, out[pair], tgt)
        w = torch.ones(n_b, dtype=torch.float64)
        w[kind == BOUNDARY] = self.p.boundary_weight
        w[kind == DENOISE] = self.p.denoise_weight
        loss = (w.to(dev) * per).mean()
        frac = {k: (kind == v).double().mean() for k, v in (("boundary", BOUNDARY), ("denoise", DENOISE))}
        return {"loss": loss, "tcm/stage": torch.tensor(2), "tcm/boundary_fraction": frac["boundary"],
                "tcm/denoise_fraction": frac["denoise"], "cd/distance": per.mean().detach()}
