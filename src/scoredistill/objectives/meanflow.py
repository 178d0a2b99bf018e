"""MeanFlow: a two-time flow-map student trained on the MeanFlow identity (arXiv 2505.13447;
docs/objectives/meanflow.md).

In the VE coordinates of any process (``y = x_t/a_t = x0 + rho eps``, the PF-ODE ``dy/drho = V =
(y - D(x_t, t))/rho``) the average velocity over ``[rho_r, rho_t]`` is
``U(y, r, t) = (y_t - y_r)/(rho_t - rho_r)`` and satisfies

    U = V - (rho_t - rho_r) dU/drho_t,     dU/drho_t = (V . d_y U) + d_rho_t U     (total derivative).

The student is a two-time denoiser ``D_theta(x_t, t, cond, r)`` (requirement ``two_time_student``): the
``x0`` whose DDIM step from ``t`` lands at the flow map's point at ``r``, so ``U_theta = (y - D_theta)/rho_t``
and at ``r = 0`` it is a consistency function (one-step sample ``D_theta(x_T, T)``). The loss is

    L = w ||U_theta - sg(V - (rho_t - rho_r)/rho'(t) dU_theta/dt)||^2,   w = sg(1/(||.||^2 + c)^p),

the total time derivative taken in canonical time by one JVP with tangent ``(V rho'(t), 0, 1)`` on
``(y, r, t)`` (``jvp: torch | fd | auto`` as in sCM). ``V`` is the teacher's (guided) PF-ODE velocity
(distillation, ``velocity: teacher``) or ``eps`` (training from data, ``velocity: data``). ``(r, t)``: two
draws of ``ln rho ~ N(-0.4, 1)`` (the paper's logit-normal in flow-matching time), sorted; a fraction
``flow_fraction`` of the pairs has ``r = t``, where the loss is flow matching of the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
from scoredistill.objectives.base import register
from scoredistill.objectives.consistency import ConsistencyParams, TangentObjective, check_ranges, check_tangent_keys
from scoredistill.process.time import LogNormal


@dataclass
class MeanFlowParams(ConsistencyParams):
    velocity: str = "teacher"     # teacher: distillation (teacher PF-ODE velocity); data: MeanFlow from data
    flow_fraction: float = 0.75   # fraction of pairs with r = t (the paper's best ratio of r != t is 25%)
    jvp: str = "auto"             # torch | fd | auto (torch.func.jvp, falling back once to fd)
    fd_step: float = 1e-4         # finite-difference step in canonical time
    adaptive_p: float = 1.0       # adaptive weight 1/(||delta||^2 + c)^p; 0 disables
    adaptive_c: float = 1e-3

    def validate(self):
        super().validate()
        check_tangent_keys(self)
        checks = {"flow_fraction": (0 <= self.flow_fraction <= 1, "in [0, 1]"), "fd_step": (self.fd_step > 0, "> 0"),
                  "adaptive_p": (self.adaptive_p >= 0, ">= 0"), "adaptive_c": (self.adaptive_c > 0, "> 0")}
        check_ranges(self, checks)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def average_velocity(student, y: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """``U_theta(y, r, t) = (y - D_theta(a_t y, t, cond, r))/rho_t`` in float64 (VE coordinates)."""
    p = student.process
    x = (_col(p.alpha(t), y) * y).to(cc.param_dtype(student) or torch.float64)
    return (y - student.denoise(x, t, cond, r=r).double()) / _col(p.rho(t), y)


def meanflow_pair(student, y, r, t, v, tangent: cc.Tangent, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_theta, target)``: the target ``sg(V - (rho_t - rho_r)/rho'(t) dU_theta/dt)`` by one JVP in
    canonical time (tangent ``(V rho'(t), 0, 1)``); at ``r = t`` it is ``V``."""
    p = student.process
    drho = torch.func.jvp(p.rho, (t,), (torch.ones_like(t),))[1]
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    u, du = tangent(lambda m, *a: average_velocity(m, *a, cond), student, (y, r, t),
                    (v * _col(drho, y), zeros, ones))
    gap = _col((p.rho(t) - p.rho(r)) / drho, y)
    return u, (v - gap * du).detach()


@register
class MeanFlow(TangentObjective):
    """The student's own JVP supplies the target (module docstring); the engine's target copy is unused."""

    name = "meanflow"
    Params = MeanFlowParams
    # ln rho ~ N(-0.4, 1): the paper's logit-normal(-0.4, 1.0) over flow-matching time t_fm = rho/(1 + rho)
    default_time = LogNormal(p_mean=-0.4, p_std=1.0)

    def requirements(self) -> set[str]:
        return super().requirements() | {"two_time_student"}

    def generator_loss(self, batch, roles):
        student, _, x0, cond, eps = self.inputs(batch, roles)
        if getattr(student, "two_time", None) is False:
            raise ConfigError("generator.kind", "meanflow needs a two-time student D(x_t, t, cond, r); accepted: "
                              "kind mlp with generator.steps >= 1 (built two-time for this objective)")
        teacher, p = roles.teacher, roles.teacher.process
        t1, t2 = self.sample_t(batch, p).double(), self.sample_t(batch, p).double()
        t, r = torch.maximum(t1, t2), torch.minimum(t1, t2)
        flow = torch.rand(len(t), generator=batch.rng, dtype=torch.float64).to(t.device) < self.p.flow_fraction
        r = torch.where(flow, t, r)
        x_t = p.add_noise(x0, eps, t).to(x0.dtype)
        y = x_t.double() / _col(p.alpha(t), x0)
        if self.p.velocity == "teacher":
            with torch.no_grad():
                v = (y - teacher.guided(x_t, t, cond, self.p.guidance_scale).double()) / _col(p.rho(t), x0)
        else:
            v = eps.double()
        u, target = meanflow_pair(student, y, r, t, v, self.tangent, cond)
        sq = (u - target).reshape(len(u), -1).pow(2).sum(1)
        w = 1.0 / (sq.detach() + self.p.adaptive_c) ** self.p.adaptive_p
        return {"loss": (w * sq).mean(), "meanflow/sq": sq.mean().detach(),
                "meanflow/flow_fraction": flow.double().mean()}
