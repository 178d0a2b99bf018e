"""VSD for a one-step generator, as in SwiftBrush (arXiv 2312.05239; VSD from arXiv 2305.16213).

Field in epsilon space ``g = w(t) (eps^w_real(x_t) - eps^{w_f}_fake(x_t))`` with ``w(t) = s_t^2``,
which in x0 space is ``g = a_t s_t (D^{w_f}_fake - D^w_real)`` (methods.md §1.2), injected with the
mean-reduced surrogate. Fully detached. ``fake_guidance_scale`` applies CFG to the fake score too
(SwiftBrush uses the teacher's scale on both; ProlificDreamer uses 1). Fake score trained by DSM on
detached samples with condition dropout so that its unconditional branch exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.common import inject, noise_like
from scoredistill.objectives.dmd import FakeScoreObjective
from scoredistill.process.time import Uniform

WEIGHTINGS = ("sds", "uniform", "x0")


@dataclass
class VSDParams(ObjectiveParams):
    fake_guidance_scale: float = 1.0
    weighting: str = "sds"         # sds: w_eps = s^2 | uniform: w_eps = 1 | x0: plain x0 difference
    fake_cond_dropout: float = 0.1

    def validate(self):
        if self.weighting not in WEIGHTINGS:
            raise ConfigError("objective.weighting",
                              f"unknown value {self.weighting!r}; accepted: {', '.join(WEIGHTINGS)}")
        if not 0 <= self.fake_cond_dropout < 1:
            raise ConfigError("objective.fake_cond_dropout", "must be in [0, 1)")


def x0_weight(weighting: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x0-space weight equal to an epsilon-space weight: ``w_x0 = w_eps a / s`` (methods.md §1.2)."""
    if weighting == "sds":
        return a * s
    if weighting == "uniform":
        return a / s
    return torch.ones_like(a)


@register
class VSD(FakeScoreObjective):
    name = "vsd"
    Params = VSDParams
    default_time = Uniform(t_min=0.02, t_max=0.98)

    def generator_loss(self, batch, roles):
        x = batch.x
        t = self.sample_t(batch, roles.process)
        with torch.no_grad():
            x_t = roles.process.add_noise(x.detach(), noise_like(x, batch.rng), t)
            d_real = roles.teacher.guided(x_t, t, batch.cond, self.p.guidance_scale)
            d_fake = roles.fake.guided(x_t, t, batch.cond, self.p.fake_guidance_scale)
            a, s = roles.process.coeffs(t, x)
            g = x0_weight(self.p.weighting, a, s) * (d_fake.double() - d_real.double())
        loss = inject(x, g.to(x.dtype))
        return {"loss": loss, "field_norm": g.flatten(1).norm(dim=1).mean(), "t_mean": t.mean()}
