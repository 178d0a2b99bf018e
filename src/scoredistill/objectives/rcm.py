"""rCM: sCM plus a DMD regulariser (arXiv 2510.08431; docs/objectives/rcm.md).

The student loss is ``scm_weight * L_sCM + dmd_weight * L_DMD``: ``L_sCM`` the sCD loss of
:mod:`.scm` on real points, ``L_DMD`` DMD's injected reverse-KL field ``(D_fake - D^w_real)/mean|x - D^w_real|``
(:func:`~.core.dm_field`, detached) on the generator's own samples ``x`` -- the K-step student's
backward-simulated rollout with fresh noise (the engine's rollout, gradient through the last step only).
A fake score ("critic") is trained on detached samples by denoising score matching (the engine's
auxiliary phase; rCM's ratio is ``train.generator_every: 5`` with ``fake_on_generator_steps: false``,
4 critic : 1 student). During the first ``dmd_start`` iterations the DMD term is off (pure sCM).
"""

from __future__ import annotations

from dataclasses import dataclass

from scoredistill.errors import ConfigError
from scoredistill.objectives.base import register
from scoredistill.objectives.core import FakeScoreObjective
from scoredistill.objectives.dmd import DMD, DMDParams
from scoredistill.objectives.scm import SCM, SCMParams


@dataclass
class RCMParams(SCMParams):
    scm_weight: float = 100.0      # rCM's loss_scale
    dmd_weight: float = 1.0        # rCM's loss_scale_dmd
    dmd_start: int = 1000          # iterations of pure sCM before the DMD term (rCM's tangent_warmup)
    fake_cond_dropout: float = 0.1

    def validate(self):
        super().validate()
        if self.scm_weight < 0 or self.dmd_weight < 0 or self.dmd_start < 0:
            raise ConfigError("objective.dmd_weight", "scm_weight, dmd_weight and dmd_start must be >= 0")


@register
class RCM(SCM, FakeScoreObjective):
    name = "rcm"
    Params = RCMParams
    uses_generator_samples = True  # the DMD term reads the student's rollout

    def __init__(self, params, time=None, fake_time=None):
        super().__init__(params, time, fake_time)
        # the DMD branch draws its own times (DMD2's U[0.02, 0.98]); the sCM branch keeps sCM's lognormal
        self.dmd = DMD(DMDParams(guidance_scale=params.guidance_scale, regression_weight=0.0,
                                 fake_cond_dropout=params.fake_cond_dropout), time=DMD.default_time)

    def requirements(self) -> set[str]:
        return SCM.requirements(self) | {"fake_score"}

    def generator_loss(self, batch, roles):
        out = SCM.generator_loss(self, batch, roles)
        loss = self.p.scm_weight * out["loss"]
        diag = {k: v for k, v in out.items() if k != "loss"}
        diag["loss_scm"] = out["loss"].detach()
        if self.p.dmd_weight > 0 and batch.step >= self.p.dmd_start:
            dm, dm_diag, _ = self.dmd.dm_loss(batch, roles)
            loss = loss + self.p.dmd_weight * dm
            diag.update(dm_diag)
        return {"loss": loss, **diag}

    def auxiliary_losses(self, batch, roles):
        return FakeScoreObjective.auxiliary_losses(self, batch, roles)
