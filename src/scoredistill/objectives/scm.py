"""sCM: continuous-time consistency distillation (sCD) and training (sCT) in TrigFlow
(arXiv 2410.11081; docs/objectives/scm.md).

Points ``x_tau = cos(tau) x0 + sin(tau) z`` (``z = sigma_data eps``, ``x0`` a real sample) at
``tau = arctan(rho(t)/sigma_data)`` with ``ln rho ~ N(-1.0, 1.4^2)``. With the student's
``F_theta = (cos(tau) x_tau - D_theta)/(sigma_data sin(tau))`` (:mod:`scoredistill.process.trigflow`) and
the target's ``F^-`` the loss is

    L = w(tau)/e^{logvar(tau)} ||F_theta - sg(F_theta) - g||^2 / dim + logvar(tau),
    g = -cos^2(tau) (sigma_data F^- - dx/dtau) - r cos(tau) sin(tau) (x_tau + sigma_data dF^-/dtau),

whose gradient is ``-2 w/e^{logvar} dF_theta/dtheta^T g``: it moves ``F_theta`` along ``g``, the direction
that makes ``f = cos(tau) x_tau - sigma_data sin(tau) F`` constant along the PF-ODE.
``dx/dtau`` is the teacher's (guided) PF-ODE velocity (sCD, ``velocity: teacher``) or
``cos(tau) z - sin(tau) x0`` (sCT, ``velocity: data``); ``dF^-/dtau`` is one forward-mode JVP of the
target (``jvp: torch``), float64 central finite differences (``fd``), or the JVP with one fallback to
finite differences (``auto``). Stabilisers: ``g <- g/(||g|| + tangent_c)``; warm-up
``r = min(1, step/warmup_steps)``; prior weight ``w = 1/(sigma_data tan(tau))``; adaptive weighting
``logvar(tau)``, here the log of a running mean of ``w ||...||^2/dim`` per tau bin, which is the minimiser
of the learned head's objective ``L/e^{logvar} + logvar`` (``lv = ln E[L | tau]``) without an optimizer
of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.consistency import ConsistencyParams, TangentObjective, check_ranges, check_tangent_keys
from scoredistill.process.time import LogNormal
from scoredistill.process.trigflow import TrigFlow, check_expressible


@dataclass
class SCMParams(ConsistencyParams):
    velocity: str = "teacher"       # teacher: sCD (teacher PF-ODE velocity); data: sCT
    jvp: str = "auto"               # torch | fd | auto (torch.func.jvp, falling back once to fd)
    fd_step: float = 1e-4           # relative finite-difference step in tau
    sigma_data: float | None = None  # TrigFlow data scale; default the student's sigma_data (0.5 without one)
    tangent_c: float = 0.1          # tangent normalisation g / (||g|| + c); 0 disables
    warmup_steps: int = 10000       # tangent warm-up r = min(1, step / warmup_steps); 0: r = 1
    adaptive: bool = True           # adaptive log-variance weighting per tau bin
    adaptive_bins: int = 16
    adaptive_rate: float = 0.99     # running-mean rate of the per-bin loss level

    def validate(self):
        super().validate()
        check_tangent_keys(self)
        checks = {"fd_step": (self.fd_step > 0, "> 0"), "tangent_c": (self.tangent_c >= 0, ">= 0"),
                  "warmup_steps": (self.warmup_steps >= 0, ">= 0"), "adaptive_bins": (self.adaptive_bins >= 1, ">= 1"),
                  "adaptive_rate": (0 <= self.adaptive_rate < 1, "in [0, 1)"),
                  "sigma_data": (self.sigma_data is None or self.sigma_data > 0, "> 0 or null")}
        check_ranges(self, checks)


@register
class SCM(TangentObjective):
    name = "scm"
    Params = SCMParams
    # sCM's proposal: ln(sigma) ~ N(-1.0, 1.4^2) with sigma = sigma_data tan(tau) (arXiv 2410.11081)
    default_time = LogNormal(p_mean=-1.0, p_std=1.4)

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time, fake_time)
        self.level: list[float] | None = None  # running loss level per tau bin (adaptive weighting)

    def check_teacher(self, teacher) -> None:
        check_expressible(teacher.process, "teacher.process")

    # -- running state: the adaptive weight's per-bin loss level -------------------------------------------
    def state_dict(self) -> dict:
        return {} if self.level is None else {"level": list(self.level)}

    def load_state_dict(self, state: dict) -> None:
        if "level" in state:
            self.level = [float(v) for v in state["level"]]

    def _logvar(self, tau: torch.Tensor, trig: TrigFlow, per: torch.Tensor) -> torch.Tensor:
        """``ln`` of the running level of ``per`` in each sample's tau bin (0 for a bin not yet seen), read
        before this batch updates it."""
        n = int(self.p.adaptive_bins)
        lo, hi = trig.tau_min, trig.tau_max
        idx = ((tau.detach().double().cpu() - lo) / max(hi - lo, 1e-12) * n).floor().long().clamp(0, n - 1)
        level = torch.tensor(self.level if self.level is not None else [0.0] * n, dtype=torch.float64)
        lv = torch.where(level[idx] > 0, level[idx].clamp(min=1e-300).log(), torch.zeros(len(idx), dtype=torch.float64))
        cnt = torch.bincount(idx, minlength=n).double()
        tot = torch.bincount(idx, weights=per.detach().double().cpu(), minlength=n)
        seen = cnt > 0
        rate = self.p.adaptive_rate
        new = torch.where(level > 0, rate * level + (1 - rate) * tot / cnt.clamp(min=1), tot / cnt.clamp(min=1))
        if bool(torch.isfinite(new[seen]).all()):
            self.level = torch.where(seen, new, level).tolist()
        return lv.to(per.device)

    # -- the loss ----------------------------------------------------------------------------------------
    def generator_loss(self, batch, roles):
        F_theta, g, tau, trig, diag = self.consistency_terms(batch, roles)
        w = cc.scm_prior_weight(trig, tau)
        per = cc.scm_loss(F_theta, g, w)
        if self.p.adaptive:
            lv = self._logvar(tau, trig, per)
            per = per / lv.exp() + lv
        return {"loss": per.mean(), **diag}

    def consistency_terms(self, batch, roles):
        """``(F_theta, g, tau, trig, diagnostics)``: the student's ``F`` at ``x_tau`` (with gradient) and the
        (normalised, warmed-up) tangent ``g`` it is moved along, before any weighting or reduction."""
        student, target, x0, cond, eps = self.inputs(batch, roles)
        teacher = roles.teacher
        sd = float(self.p.sigma_data or getattr(student, "sigma_data", 0.5))
        trig = TrigFlow(teacher.process, sd)
        t = self.sample_t(batch, teacher.process).to(torch.float64)
        tau = trig.tau(t)
        x_tau = trig.add_noise(x0, eps, tau)
        if self.p.velocity == "teacher":
            dx = cc.teacher_velocity(trig, teacher, x_tau.to(x0.dtype), t, cond, self.p.guidance_scale)
        else:
            dx = trig.velocity_target(x0, eps, tau)
        F_minus, dF = cc.scm_target_tangent(trig, target, x_tau, t, dx, self.tangent, cond)
        F_theta = trig.F(student, x_tau, t, cond, dtype=cc.param_dtype(student))
        r = cc.tangent_warmup(batch.step, self.p.warmup_steps)
        g = cc.scm_tangent(trig, F_minus, dF, x_tau, dx, tau, r)
        g_norm = g.reshape(len(g), -1).norm(dim=1)
        if self.p.tangent_c > 0:
            g = cc.normalize_tangent(g, self.p.tangent_c)
        return F_theta, g, tau, trig, {"scm/tangent_norm": g_norm.mean().detach(), "scm/warmup_r": torch.tensor(r),
                                       "scm/tau_mean": tau.mean().detach() * (2 / math.pi)}
