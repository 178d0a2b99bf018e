"""SDS — Score Distillation Sampling (DreamFusion, arXiv 2209.14988), and the helpers its family shares.

Field (epsilon space, methods.md §2.1): ``g = w(t) (eps^w_real(x_t, t, c) - eps)`` with
``x_t = a_t x + s_t eps``, injected at ``x`` with the threestudio reduction (``sum / B``, so
``dL/dx_i = g_i``; methods.md §1.4). Teacher call under ``no_grad`` (U-Net Jacobian dropped), fresh
noise every call, per-sample ``t ~ U[0.02, 0.98]`` by default.

Weightings (threestudio ``weighting_strategy``): ``sds`` ``w = 1 - alpha_bar = s_t^2``; ``uniform``
``w = 1``; ``fantasia3d`` ``w = sqrt(alpha_bar) (1 - alpha_bar) = a_t s_t^2``. For non-VP processes the
same formulas are read with the process's own ``a_t, s_t``.

Numerics: an optional element-wise clamp ``|g| <= grad_clamp`` (threestudio ``grad_clip``,
"Debiasing SDS" arXiv 2303.15413), schedulable by the optimizer driver
(``[start_step, start, end, end_step]``). threestudio's ``nan_to_num`` is deliberately not applied: a
non-finite field reaches the driver's guard (skipped and counted) instead of being zeroed silently.
Guidance is canonical (``w = 1`` unguided); threestudio's ``cond + s (cond - uncond)`` is converted at
config load (``teacher.guidance_convention: cond_plus``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Objective, ObjectiveParams, register
from scoredistill.objectives.common import inject, noise_like
from scoredistill.process.time import Uniform

WEIGHTINGS = ("sds", "uniform", "fantasia3d")


# -- shared helpers of the SDS family ---------------------------------------------------------------
def eps_weight(kind: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Epsilon-space weight ``w(t)`` (threestudio names): sds ``s^2``, uniform ``1``, fantasia3d ``a s^2``."""
    if kind == "sds":
        return s * s
    if kind == "uniform":
        return torch.ones_like(a)
    if kind == "fantasia3d":
        return a * s * s
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {kind!r}")


def to_eps(process, x_t: torch.Tensor, d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``eps_hat = (x_t - a_t D) / s_t`` in float64 (methods.md §1.2)."""
    a, s = process.coeffs(t, x_t)
    return (x_t.double() - a * d.double()) / s


def eps_of(net, x_t: torch.Tensor, t: torch.Tensor, cond, w: float = 1.0) -> torch.Tensor:
    """Canonical-CFG epsilon of a denoiser, float64 (``w = 1``: the plain conditional call)."""
    return to_eps(net.process, x_t, net.guided(x_t, t, cond, w), t)


def finish_field(g: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """The optional element-wise clamp (threestudio ``grad_clip``). The reference codes also apply
    ``nan_to_num``; the library does not (see :func:`~scoredistill.objectives.common.inject`): a
    non-finite field makes the loss non-finite and the driver's guard skips the step and counts it."""
    if clamp is not None and clamp > 0:
        g = g.clamp(-float(clamp), float(clamp))
    return g


def null_like(cond: torch.Tensor | None) -> torch.Tensor | None:
    """The unconditional label for every sample (``None`` stays ``None``)."""
    return None if cond is None else torch.full_like(cond, -1)


def field_diag(g: torch.Tensor, t: torch.Tensor, **extra) -> dict:
    out = {"field_norm": g.flatten(1).norm(dim=1).mean().float(), "t_mean": t.double().mean().float()}
    out.update({k: torch.as_tensor(v).double().mean().float() for k, v in extra.items()})
    return out


def check_weighting(value: str) -> None:
    if value not in WEIGHTINGS:
        raise ConfigError("objective.weighting",
                          f"unknown value {value!r}; accepted: {', '.join(WEIGHTINGS)}")


def check_clamp(value) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
        raise ConfigError("objective.grad_clamp", f"must be a number >= 0 or null, got {value!r}")


class FieldObjective(Objective):
    """An objective whose whole generator loss is an injected, fully detached field ``g``."""

    reduction = "sum_per_sample"  # threestudio / Consistent3D / ASD: sum over elements / B

    def field(self, batch, roles) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def generator_loss(self, batch, roles):
        with torch.no_grad():
            g, diag = self.field(batch, roles)
        x = batch.x
        loss = inject(x, g.to(x.dtype), self.reduction)
        return {"loss": loss, **diag}


# -- SDS ---------------------------------------------------------------------------------------------
@dataclass
class SDSParams(ObjectiveParams):
    guidance_scale: float = 100.0     # canonical; DreamFusion's omega (threestudio: 100 cond_plus = 101)
    weighting: str = "sds"
    grad_clamp: float | None = None   # element-wise |g| bound (schedulable); null: off

    def validate(self):
        check_weighting(self.weighting)
        check_clamp(self.grad_clamp)
        if self.guidance_scale < 0:
            raise ConfigError("objective.guidance_scale", "must be >= 0 (canonical CFG, 1 = unguided)")


@register
class SDS(FieldObjective):
    name = "sds"
    Params = SDSParams
    default_time = Uniform(t_min=0.02, t_max=0.98)

    def field(self, batch, roles):
        x = batch.x.detach()
        p = roles.process
        t = self.sample_t(batch, p)
        eps = noise_like(x, batch.rng)
        x_t = p.add_noise(x, eps, t)
        e_real = eps_of(roles.teacher, x_t, t, batch.cond, self.p.guidance_scale)
        a, s = p.coeffs(t, x)
        g = finish_field(eps_weight(self.p.weighting, a, s) * (e_real - eps.double()), self.p.grad_clamp)
        return g, field_diag(g, t)
