"""rCM: sCM plus a DMD regulariser (arXiv 2510.08431; docs/objectives/rcm.md).

The student loss is ``scm_weight * L_sCM + dmd_weight * L_DMD``: ``L_sCM`` the sCD consistency term of
:mod:`.scm` on real points, ``L_DMD`` DMD's injected reverse-KL field ``g = (D_fake - D^w_real)/mean|x - D^w_real|``
(:func:`~.core.dm_field`, detached) on the generator's own samples ``x``. With ``reduction: sum`` (rCM's code,
the default) both terms are per-sample sums over the elements, averaged over the batch:

    L_sCM = ||F_theta - sg(F_theta) - g_cm||^2,   L_DMD = ||x - sg(x - g)||^2,

with no prior or adaptive weight on the consistency term, so the 100 : 1 weights hold their published balance
at any data size (the DMD term's share grows like sqrt(elements)); ``reduction: mean`` is the weighted,
element-averaged sCM loss of :mod:`.scm` plus DMD2's ``1/2 mean`` (earlier releases), where the DMD term is
about 1/(200 sqrt(elements)) of the consistency term's size and has no measurable effect
(docs/objectives/rcm.md). ``x`` is the K-step student's
backward-simulated rollout with fresh noise (the engine's rollout, gradient through the last step only).
A fake score ("critic") is trained on detached samples by denoising score matching (the engine's
auxiliary phase; rCM's ratio is ``train.generator_every: 5`` with ``fake_on_generator_steps: false``,
4 critic : 1 student). During the first ``dmd_start`` iterations the DMD term is off (pure sCM).
"""

from __future__ import annotations

from dataclasses import dataclass

from scoredistill.errors import ConfigError
from scoredistill.objectives import consistency_core as cc
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
    reduction: str = "sum"         # sum: rCM's per-sample sums, unweighted; mean: sCM's weighted mean + DMD2's mean
    adaptive: bool = False         # rCM's code has no adaptive weighting (only with reduction: mean)

    def validate(self):
        super().validate()
        if self.scm_weight < 0 or self.dmd_weight < 0 or self.dmd_start < 0:
            raise ConfigError("objective.dmd_weight", "scm_weight, dmd_weight and dmd_start must be >= 0")
        if self.reduction not in ("sum", "mean"):
            raise ConfigError("objective.reduction", f"accepted: sum (rCM's code), mean; got {self.reduction!r}")
        if self.reduction == "sum" and self.adaptive:
            raise ConfigError("objective.adaptive", "rCM's summed loss has no adaptive weighting; accepted with "
                              "reduction sum: false (or set reduction: mean)")


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
        if self.p.reduction == "sum":
            F_theta, g, _, _, diag = self.consistency_terms(batch, roles)
            out = {"loss": cc.scm_loss(F_theta, g, float(F_theta[0].numel())).mean(), **diag}
        else:
            out = SCM.generator_loss(self, batch, roles)
        loss = self.p.scm_weight * out["loss"]
        diag = {k: v for k, v in out.items() if k != "loss"}
        diag["loss_scm"] = out["loss"].detach()
        if self.p.dmd_weight > 0 and batch.step >= self.p.dmd_start:
            dm, dm_diag, _ = self.dmd.dm_loss(batch, roles)
            if self.p.reduction == "sum":  # 1/2 mean over B x D elements -> mean over B of the per-sample sum
                dm = dm * (2 * batch.x[0].numel())
            loss = loss + self.p.dmd_weight * dm
            diag.update(dm_diag)
        return {"loss": loss, **diag}

    def auxiliary_losses(self, batch, roles):
        return FakeScoreObjective.auxiliary_losses(self, batch, roles)
