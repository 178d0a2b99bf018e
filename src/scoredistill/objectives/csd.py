"""CSD — Classifier Score Distillation (arXiv 2310.19415; docs/optimize/csd.md).

Implementation form of the official code (``deep_floyd_simple_guidance.py``):
``g = w(t) [lambda_c eps(x_t, c) + lambda_neg eps(x_t, c_neg) + lambda_null eps(x_t, null) + lambda_n eps]``.
Pure CSD is ``(1, 0, -1, 0)``: ``g = w(t) (eps_c - eps_null)``, the implicit-classifier score only
(SDS would be ``(w, 1 - w, 0, -1)``, the comment in the same file). The negative condition is a class
label (``negative_class``); the official configs anneal ``lambda_neg`` 0 -> -1 and ``lambda_null``
-1 -> 0 (schedule them: ``[start_step, start, end, end_step]``).

``grad_normalize`` (default true, load-bearing): ``g <- g / (||g||_2 + 1e-8)`` with the norm over the
**whole batch tensor**, not per sample, applied after the optional clamp (the official order; its
``nan_to_num`` is left to the driver's non-finite guard). Weighting default ``uniform`` (csd-if.yaml). No CFG scale:
``guidance_scale`` is not used by this field (it is the lambdas). Needs a conditional teacher.
On a GMM the field has no zero at the data: particles drift without bound along discriminative
directions (over-saturation); stop early or anneal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.core import (
    ClassFieldObjective,
    clamp_key,
    class_key,
    eps_of,
    eps_weight,
    field_diag,
    finish_field,
    null_like,
    weighting_key,
)


@dataclass
class CSDParams(ObjectiveParams):
    weighting: str = weighting_key("uniform")
    lambda_cond: float = key(1.0, "coefficient of eps(x_t, c)")
    lambda_neg: float = key(0.0, "coefficient of eps(x_t, negative_class)")
    lambda_null: float = key(-1.0, "coefficient of eps(x_t, null)")
    lambda_noise: float = key(0.0, "coefficient of the injected noise")
    negative_class: int | None = class_key(None, "label of the negative condition (needed if lambda_neg != 0)")
    grad_normalize: bool = key(True, "g / ||g|| over the whole batch tensor (official, load-bearing)")
    grad_clamp: float | None = clamp_key()


@register
class CSD(ClassFieldObjective):
    name = "csd"
    Params = CSDParams

    def field(self, batch, roles):
        p = roles.process
        x, t, eps, x_t = self.noised(batch, p)
        q = self.p
        g = torch.zeros_like(x, dtype=torch.float64)
        if q.lambda_cond:
            g = g + q.lambda_cond * eps_of(roles.teacher, x_t, t, batch.cond)
        if q.lambda_null:
            g = g + q.lambda_null * eps_of(roles.teacher, x_t, t, null_like(batch.cond))
        if q.lambda_neg:
            if q.negative_class is None:
                raise ConfigError("objective.negative_class", "needed when lambda_neg != 0")
            neg = torch.full_like(batch.cond, q.negative_class)
            g = g + q.lambda_neg * eps_of(roles.teacher, x_t, t, neg)
        if q.lambda_noise:
            g = g + q.lambda_noise * eps.double()
        a, s = p.coeffs(t, x)
        g = finish_field(eps_weight(q.weighting, a, s) * g, q.grad_clamp)  # clamp, then normalise
        raw = g.norm()                                                       # (official order)
        if q.grad_normalize:
            g = g / (raw + 1e-8)
        return g, field_diag(g, t, raw_norm=raw)
