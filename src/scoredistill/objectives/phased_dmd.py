"""Phased DMD: distribution matching within noise sub-intervals, one expert per phase (arXiv 2510.27684;
docs/objectives/phased_dmd.md).

The student's time range ``(0, t_0]`` is split at boundaries ``b_1 > ... > b_{P-1}`` into phases; phase ``p``
covers ``(b_{p+1}, b_p]`` (``b_0`` the top of the range, ``b_P = 0``) and has its own step network (expert,
models/fewstep.py ``PhaseExperts``). Default boundaries are the student's step times: one phase per step. A
step ``k`` inside phase ``p`` does not produce clean data: its output is the DDIM jump of its prediction to the
phase's lower level ``t_s = b_{p+1}``,

    x_s = a_s x0_k + s_s eps_k,        eps_k = (x_k - a_k x0_k) / s_k   (the student's own noise estimate)

(``x_s = x0_k`` in the last phase), the next phase's input. Matching ``q_s`` (the law of ``x_s``) to the teacher's
marginal ``p_s`` is what phase ``p`` is trained for, and every marginal ``p_t``, ``t > s``, is ``p_s`` diffused
further by the Markov forward process: in the canonical process ``x_t = a_t x + s_t eps``,

    x_t = alpha x_s + beta n,     alpha = a_t / a_s,     beta^2 = s_t^2 - alpha^2 s_s^2,     n ~ N(0, I).

So the teacher and the fake score are read only at ``t`` in ``(t_s + margin, b_p]`` (clipped to
``objective.time``), where ``q_t`` is ``q_s`` diffused:

* **Generator field** at ``x_s``: Tweedie's formula for the sub-interval gives each network's estimate of
  ``x_s`` from ``x_t``, ``E[x_s | x_t] = alpha s_s^2 / s_t^2 x_t + beta^2 a_s / s_t^2 D(x_t)``; the field is
  DMD2's normalised difference in ``x_s`` (``g = (E_fake - E_real) / mean|x_s - E_real|``, injected with a mean
  reduction), which is DMD2's field exactly in the last phase (``s_s = 0``).
* **Fake score**: denoising score matching conditional on the sub-interval. With ``x_t`` built from
  ``sg(x_s)``, ``-n / beta`` is an unbiased target of ``grad log q_t(x_t)`` (its expectation given ``x_t`` is the
  score of ``q_t``); in the x0 units of the fake network (score ``(a_t D - x_t) / s_t^2``) this is
  ``D* = (x_t - s_t^2 n / beta) / a_t`` (eps units ``s_t n / beta``; the rectified-flow velocity of the reference
  code, ``-x_s / (1 - s_s) + (s_t + (1 - s_t) s_s^2 / (1 - s_s)^2) n / beta``, is the same target). The loss is
  the EDM-weighted x0 regression onto ``D*`` times ``beta^2 / s_t^2``, which keeps the target's variance that of
  plain DSM (and is plain DSM in the last phase).

Schedule (``objective.phase_schedule``): ``simultaneous`` trains a step drawn from all ``K`` every iteration;
``progressive`` (the paper's "progressively refining the model to higher SNR levels") trains phase 0 alone for
``phase_iterations[0]`` distillation iterations, then phase 1, ..., then returns to the simultaneous draw. Backward
simulation runs the finished phases' experts without gradient, and the fake score sees only the current phase's
interval. The engine applies the schedule through :meth:`Objective.rollout_step` (a function of the iteration).

Without a rollout (a direct call with only ``x``, as in the contract tests) ``x`` is a last-phase output: the
objective is DMD2 on the whole range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scoredistill.config import is_int, is_number, key
from scoredistill.errors import ConfigError
from scoredistill.models.fewstep import check_split, phase_index
from scoredistill.models.rollout import draw_step
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import drop_condition, edm_weight, noise_like
from scoredistill.objectives.core import (
    FakeScoreObjective,
    dm_normaliser,
    dropout_key,
    guidance_key,
    inject,
    uniform_time,
)
from scoredistill.process.processes import Process

SCHEDULES = ("simultaneous", "progressive")


def _iterations_check(v, f):
    items = v if isinstance(v, (list, tuple)) else [v]
    if not items or not all(is_int(x) and x >= 1 for x in items):
        raise ConfigError(f, f"must be a positive integer or a list of positive integers (iterations of each phase, "
                          f"in phase order), got {v!r}")


def _times_check(v, f):
    if not isinstance(v, (list, tuple)) or not all(is_number(x) for x in v):
        raise ConfigError(f, f"must be a list of canonical times (decreasing, inside the student's range), got {v!r}")


@dataclass
class PhasedDMDParams(ObjectiveParams):
    guidance_scale: float = guidance_key()
    boundaries: list[float] | None = key(None, "phase boundaries: canonical times, strictly decreasing, inside (0, "
                                         "the student's first step time); null: the student's step times after the "
                                         "first (one phase per step)", check=_times_check,
                                         accepts="a list of canonical times")
    margin: float = key(0.02, "teacher and fake times stay this far (canonical time) above each phase's level "
                        "(reference: 20 of 1000 steps)", lo=0, hi=0.5, lo_open=True, hi_open=True)
    fake_cond_dropout: float = dropout_key()
    phase_schedule: str = key("simultaneous", "simultaneous: every phase trains all along (one drawn step per "
                              "iteration); progressive: phase 0 (noisiest) alone for phase_iterations[0] "
                              "iterations, then phase 1, ..., then all phases as in simultaneous",
                              choices=SCHEDULES)
    phase_iterations: list[int] | int | None = key(None, "progressive schedule: the distillation iterations (after "
                                                   "generator.init_steps) of each phase, one positive integer per "
                                                   "phase or one for all", check=_iterations_check,
                                                   accepts="a positive integer or a list of positive integers")

    def validate(self) -> None:
        if self.phase_schedule == "progressive" and self.phase_iterations is None:
            raise ConfigError("objective.phase_iterations", "phase_schedule: progressive needs the iterations of "
                              "each phase; accepted: a positive integer or a list of positive integers")
        if self.phase_schedule != "progressive" and self.phase_iterations is not None:
            raise ConfigError("objective.phase_iterations", "is read only by phase_schedule: progressive; accepted: "
                              "null, or set objective.phase_schedule=progressive")


def level_coeffs(process: Process, t_s: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_s, s_s)`` of a phase's level, float64, broadcastable against ``like``; exactly ``(1, 0)`` at
    ``t_s = 0`` (the last phase ends at clean data, also for processes whose noise is positive at ``t = 0``)."""
    a, s = process.coeffs(t_s, like)
    clean = (t_s <= 0).to(like.device).view_as(a)
    return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)


@dataclass
class SubInterval:
    """The forward process from a phase's level ``t_s`` to ``t > t_s``: ``x_t = alpha x_s + beta n`` (float64
    coefficients shaped ``(B, 1, ...)``; module docstring)."""

    a_s: torch.Tensor
    s_s: torch.Tensor
    a_t: torch.Tensor
    s_t: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor

    @classmethod
    def of(cls, process: Process, t_s: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> SubInterval:
        a_s, s_s = level_coeffs(process, t_s, like)
        a_t, s_t = process.coeffs(t, like)
        alpha = a_t / a_s
        beta = (s_t * s_t - (alpha * s_s) ** 2).clamp(min=1e-24).sqrt()
        return cls(a_s, s_s, a_t, s_t, alpha, beta)

    def forward(self, x_s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha x_s + beta n`` in ``x_s``'s dtype."""
        return (self.alpha * x_s.double() + self.beta * n.double()).to(x_s.dtype)

    def x0_target(self, x_t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The fake network's unbiased x0 target ``D* = (x_t - s_t^2 n / beta) / a_t`` (float64)."""
        return (x_t.double() - self.s_t * self.s_t * n.double() / self.beta) / self.a_t

    def level_mean(self, x_t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``E[x_s | x_t]`` under the density whose denoiser output at ``x_t`` is ``d`` (Tweedie, float64)."""
        s2 = self.s_t * self.s_t
        return self.alpha * self.s_s * self.s_s / s2 * x_t.double() + self.beta * self.beta * self.a_s / s2 * d.double()

    def weight(self) -> torch.Tensor:
        """``beta^2 / s_t^2``: the factor that keeps the sub-interval target's variance that of plain DSM."""
        return (self.beta / self.s_t) ** 2


@register
class PhasedDMD(FakeScoreObjective):
    name = "phased_dmd"
    Params = PhasedDMDParams
    # the phase output is the DDIM jump with the student's own noise estimate, which is the next step's input only
    # with DDIM re-noising
    rollout_modes: ClassVar[tuple[str, ...]] = ("ddim",)

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time=time, fake_time=fake_time)
        uniform_time(self, "draws its times uniformly above each phase's level, clipped to [t_min, t_max]")

    def requirements(self):
        return {"fake_score", "rollout", "experts"}

    # -- phases ---------------------------------------------------------------------------------------------
    def phase_split(self, times: list[float]) -> list[float]:
        """``objective.boundaries`` checked against the student's step times (default: ``times[1:]``, one phase
        per step); every phase must hold a step and leave scoring times above its level."""
        if self.p.boundaries is None:
            split = [float(v) for v in times[1:]]
        else:
            split = check_split(self.p.boundaries, times[0], "objective.boundaries")
        held = set(phase_index(torch.tensor(times, dtype=torch.float64), split).tolist())
        empty = [p for p in range(len(split) + 1) if p not in held]
        if empty:
            raise ConfigError("objective.boundaries", f"phase(s) {empty} of boundaries {split} hold none of the "
                              f"student's step times {[round(v, 6) for v in times]}: each phase's expert needs a step")
        tops, lows = [self.time.t_max] + split, split + [0.0]
        for p, (hi, lo) in enumerate(zip(tops, lows)):
            if max(lo + self.p.margin, self.time.t_min) >= min(hi, self.time.t_max):
                raise ConfigError("objective.margin", f"phase {p} ({lo:g}, {hi:g}] leaves no time above its level "
                                  f"+ margin ({self.p.margin:g}) inside objective.time [{self.time.t_min:g}, "
                                  f"{self.time.t_max:g}]; use a smaller margin or fewer phases")
        return split

    # -- progressive schedule -------------------------------------------------------------------------------
    def _schedule(self, rollout) -> tuple[list[int], list[list[int]]]:
        """``(ends, steps)``: the distillation iteration at which each phase's turn ends (cumulative
        ``phase_iterations``) and the student's steps inside each phase."""
        split = self.phase_split(list(rollout.times))
        who = phase_index(torch.tensor(rollout.times, dtype=torch.float64), split).tolist()
        steps = [[k for k, p in enumerate(who) if p == q] for q in range(len(split) + 1)]
        counts = self.p.phase_iterations
        counts = [int(counts)] * len(steps) if not isinstance(counts, (list, tuple)) else [int(c) for c in counts]
        if len(counts) != len(steps):
            raise ConfigError("objective.phase_iterations", f"lists {len(counts)} phases but the student has "
                              f"{len(steps)} (boundaries {split}); accepted: one positive integer per phase, or "
                              "one for all")
        ends = [sum(counts[:q + 1]) for q in range(len(counts))]
        return ends, steps

    def check_rollout(self, rollout, iterations: int) -> None:
        if self.p.phase_schedule != "progressive":
            return
        ends, steps = self._schedule(rollout)
        if ends[-1] > iterations:
            raise ConfigError("objective.phase_iterations", f"the phases take {ends[-1]} iterations but the run "
                              f"distills for {iterations} (train.steps less generator.init_steps): the last phases "
                              "would not train; accepted: a sum of at most that")
        w = rollout.step_weights
        if w is not None and any(sum(w[k] for k in ks) <= 0 for ks in steps):
            raise ConfigError("generator.step_weights", f"{w} give a phase of steps {steps} no weight, so the "
                              "progressive schedule cannot train it; accepted: a positive weight in every phase")

    def rollout_step(self, iteration: int, rollout, seed: int) -> int | None:
        """Progressive schedule: a step of the current phase (drawn from ``seed`` by ``generator.step_weights``
        restricted to the phase, uniform by default); ``None`` (the simultaneous draw) after the last phase."""
        if self.p.phase_schedule != "progressive":
            return None
        times = tuple(rollout.times)
        if getattr(self, "_cached", (None,))[0] != times:  # one check of the split per run, not per iteration
            self._cached = (times, self._schedule(rollout))
        ends, steps = self._cached[1]
        phase = next((q for q, end in enumerate(ends) if iteration < end), None)
        if phase is None:
            return None
        ks = steps[phase]
        w = rollout.step_weights
        return ks[draw_step(seed, len(ks), None if w is None else [w[k] / sum(w[j] for j in ks) for k in ks])]

    def _levels(self, batch: Batch, process: Process) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_s, t_s, t_top)``: the trained step's phase output (on ``x``'s graph) at its phase's level ``t_s``,
        and the phase's top time; without a rollout ``x`` itself on the whole range."""
        x, so = batch.x, batch.rollout
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        if so is None:
            return x, 0.0 * ones, ones
        t_k = so.t.to(x.device)
        if self.p.boundaries is None:  # one phase per step: (t_{k+1}, t_k], the first up to the range's top
            t_s = so.t_next.to(x.device)
            t_top = t_k if so.step > 0 else ones
        else:
            split = [float(b) for b in self.p.boundaries]
            who = phase_index(t_k, split)
            t_s = torch.tensor(split + [0.0], dtype=torch.float64, device=x.device)[who]
            t_top = torch.tensor([1.0] + split, dtype=torch.float64, device=x.device)[who]
        a_s, s_s = level_coeffs(process, t_s, x)
        eps = process.from_x0(so.x_t, x, so.t, "eps")  # the student's own noise estimate, on x's graph
        x_s = (a_s * x.double() + s_s * eps.double()).to(x.dtype)
        return x_s, t_s, t_top

    def _times(self, batch: Batch, process: Process, t_s: torch.Tensor, t_top: torch.Tensor) -> torch.Tensor:
        """``t ~ U[max(t_s + margin, t_min), min(t_top, t_max)]``: strictly above each sample's level."""
        lo = (t_s + self.p.margin).clamp(min=max(self.time.t_min, process.t_min))
        hi = torch.maximum(t_top.clamp(max=min(self.time.t_max, process.t_max)), lo)
        u = torch.rand(t_s.shape[0], generator=batch.rng, dtype=torch.float64).to(t_s.device)
        return lo + u * (hi - lo)

    def _noised(self, batch: Batch, process: Process):
        """``(x_s, t_s, t, n, sub, x_t)`` of one call; ``x_t`` from the detached ``x_s``."""
        x_s, t_s, t_top = self._levels(batch, process)
        t = self._times(batch, process, t_s, t_top)
        n = noise_like(x_s, batch.rng)
        sub = SubInterval.of(process, t_s, t, x_s)
        return x_s, t_s, t, n, sub, sub.forward(x_s.detach(), n)

    # -- losses ---------------------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        x_s, t_s, t, _, sub, x_t = self._noised(batch, roles.process)
        with torch.no_grad():
            e_real = sub.level_mean(x_t, roles.teacher.guided(x_t, t, batch.cond, self.p.guidance_scale))
            e_fake = sub.level_mean(x_t, roles.fake(x_t, t, batch.cond))
            norm = dm_normaliser(x_s.detach().double(), e_real)
            g = ((e_fake - e_real) / norm).to(x_s.dtype)
        loss = inject(x_s, g)
        return {"loss": loss, "loss_dm": loss.detach(), "field_norm": g.flatten(1).norm(dim=1).mean(),
                "normaliser": norm.mean().float(), "t_mean": t.mean().float(), "t_level_mean": t_s.mean().float()}

    def auxiliary_losses(self, batch: Batch, roles: Roles) -> dict:
        with torch.no_grad():
            x_s, _, t, n, sub, x_t = self._noised(batch, roles.process)
            target = sub.x0_target(x_t, n)
        cond = drop_condition(batch.cond, self.p.fake_cond_dropout, batch.rng)
        pred = roles.fake(x_t, t, cond)
        w = edm_weight(roles.process, t, getattr(roles.fake, "sigma_data", 0.5), x_s).double() * sub.weight()
        loss = (w * (pred.double() - target) ** 2).mean().to(pred.dtype)
        return {"loss": loss, "loss_fake": loss.detach()}
