"""SDS — Score Distillation Sampling (DreamFusion, arXiv 2209.14988; docs/optimize/sds.md).

Field (epsilon space): ``g = w(t) (eps^w_real(x_t, t, c) - eps)`` with ``x_t = a_t x + s_t eps`` --
the score-difference field of :mod:`.core` with the injected noise as the fake -- injected at ``x``
with the threestudio reduction (``sum / B``, so ``dL/dx_i = g_i``). Teacher call under ``no_grad``
(U-Net Jacobian dropped), fresh noise every call, per-sample ``t ~ U[0.02, 0.98]`` by default.

Weightings (threestudio ``weighting_strategy``, :data:`~.core.WEIGHTINGS`): ``sds``
``w = 1 - alpha_bar = s_t^2``; ``uniform`` ``w = 1``; ``fantasia3d`` ``w = sqrt(alpha_bar) (1 - alpha_bar)
= a_t s_t^2``; ``x0`` ``w = s_t / a_t``. For non-VP processes the same formulas are read with the
process's own ``a_t, s_t``.

Numerics: an optional element-wise clamp ``|g| <= grad_clamp`` (threestudio ``grad_clip``,
"Debiasing SDS" arXiv 2303.15413), schedulable by the optimizer driver
(``[start_step, start, end, end_step]``). threestudio's ``nan_to_num`` is deliberately not applied: a
non-finite field reaches the driver's guard (skipped and counted) instead of being zeroed silently.
Guidance is canonical (``w = 1`` unguided); threestudio's ``cond + s (cond - uncond)`` is converted at
config load (``teacher.guidance_convention: cond_plus``).
"""

from __future__ import annotations

from dataclasses import dataclass

from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.core import (
    FieldObjective,
    clamp_key,
    eps_of,
    field_diag,
    finish_field,
    guidance_key,
    score_field,
    weighting_key,
)


@dataclass
class SDSParams(ObjectiveParams):
    guidance_scale: float = guidance_key(100.0, "canonical CFG scale: DreamFusion's omega (threestudio's "
                                               "100 in cond_plus = 101)")
    weighting: str = weighting_key()
    grad_clamp: float | None = clamp_key()


@register
class SDS(FieldObjective):
    name = "sds"
    Params = SDSParams

    def field(self, batch, roles):
        p = roles.process
        x, t, eps, x_t = self.noised(batch, p)
        e_real = eps_of(roles.teacher, x_t, t, batch.cond, self.p.guidance_scale)
        a, s = p.coeffs(t, x)
        g = finish_field(score_field(self.p.weighting, a, s, e_real, eps, "eps"), self.p.grad_clamp)
        return g, field_diag(g, t)
