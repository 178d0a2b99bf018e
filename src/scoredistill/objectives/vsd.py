"""VSD for a one-step generator, as in SwiftBrush (arXiv 2312.05239; VSD from arXiv 2305.16213;
docs/objectives/vsd.md).

Field in epsilon space ``g = w(t) (eps^w_real(x_t) - eps^{w_f}_fake(x_t))`` with ``w(t) = s_t^2``,
written in x0 units ``g = a_t s_t (D^{w_f}_fake - D^w_real)`` (:func:`~.core.score_field`; the
optimizer's ``vsd_particles`` computes the same field in epsilon units), injected with the
mean-reduced surrogate. Fully detached. ``fake_guidance_scale`` applies CFG to the fake score too
(SwiftBrush uses the teacher's scale on both; ProlificDreamer uses 1). Fake score trained by DSM on
detached samples with condition dropout so that its unconditional branch exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import noise_like
from scoredistill.objectives.core import FakeScoreObjective, dropout_key, inject, score_field, weighting_key


@dataclass
class VSDParams(ObjectiveParams):
    fake_guidance_scale: float = key(1.0, "canonical CFG scale on the fake score")
    weighting: str = weighting_key()
    fake_cond_dropout: float = dropout_key()


@register
class VSD(FakeScoreObjective):
    name = "vsd"
    Params = VSDParams

    def scales(self, batch: Batch) -> tuple[float, float, dict]:
        """This step's CFG scales on the teacher and on the fake score, and their diagnostics."""
        return self.p.guidance_scale, self.p.fake_guidance_scale, {}

    def teacher_x0(self, roles: Roles, x_t, t, cond, w: float) -> torch.Tensor:
        return roles.teacher.guided(x_t, t, cond, w)

    def generator_loss(self, batch, roles):
        x = batch.x
        w, w_fake, diag = self.scales(batch)
        t = self.sample_t(batch, roles.process)
        with torch.no_grad():
            x_t = roles.process.add_noise(x.detach(), noise_like(x, batch.rng), t)
            d_real = self.teacher_x0(roles, x_t, t, batch.cond, w)
            d_fake = roles.fake.guided(x_t, t, batch.cond, w_fake)
            a, s = roles.process.coeffs(t, x)
            g = score_field(self.p.weighting, a, s, d_real, d_fake, "x0")
        loss = inject(x, g.to(x.dtype))
        return {"loss": loss, **diag, "field_norm": g.flatten(1).norm(dim=1).mean(), "t_mean": t.mean()}
