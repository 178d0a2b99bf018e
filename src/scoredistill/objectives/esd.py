"""VSD for optimized samples (ProlificDreamer, arXiv 2305.16213; docs/optimize/vsd_particles.md) and
ESD — Entropic Score Distillation (arXiv 2401.00909; docs/optimize/esd.md).

Field (epsilon space): ``g = w(t) (eps^w_real(x_t, t, c) - eps_fake(x_t, t, c, view))``,
``w = 1 - alpha_bar = s_t^2`` (weighting ``sds``), fully detached, threestudio reduction
(``sum / B``): the score-difference field :func:`~.core.score_field` that the generator's ``vsd``
computes in x0 units. The fake score ``phi`` is a learned denoiser of the *current samples* conditioned on the
teacher condition ``c`` and a **view** (the camera of 3-D work; for particles the particle index or a
group id): it is trained by denoising score matching on detached renders with condition dropout
(``fake_cond_dropout`` on ``c``, ``fake_view_dropout`` on the view, 10 % each by default, ProlificDreamer's
``uncond_p`` / threestudio's camera drop).

* ``vsd_particles``: ``eps_fake = eps_phi(x_t, t, c, view)`` — ProlificDreamer (LoRA CFG 1). Without a
  view the fake is the exact-in-the-limit score of the sample distribution, whose fixed point is
  ``q = p`` (w = 1); with a per-particle view the fake becomes a Dirac per view and VSD degenerates to
  SDS (the ESD argument).
* ``esd``: ``eps_fake = lambda eps_phi(x_t, t, c, null view) + (1 - lambda) eps_phi(x_t, t, c, view)``.
  ``lambda = 0`` is ``vsd_particles``; ``lambda = 1`` uses the view-marginal fake (maximum entropy).
  In threestudio terms ``guidance_scale_lora = s`` means ``lambda = 1 - s``; the official recommendation
  ``s = 0.5`` is the default ``lambda = 0.5``.

``fake_guidance_scale`` (canonical, default 1) applies CFG over ``c`` on the fake inside each view
branch (SwiftBrush-style); ProlificDreamer and ESD use 1.

The fake role is called with ``cond`` of shape ``(B, 2)`` = ``[class, view]`` (``-1`` = null in either
slot) when it declares ``takes_view = True`` (the optimizer driver's
:class:`~scoredistill.optimize.fake.ViewConditionedDenoiser`); a plain denoiser gets the class only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.models.denoiser import NULL_CLASS
from scoredistill.objectives.base import ObjectiveParams, register
from scoredistill.objectives.common import drop_condition
from scoredistill.objectives.core import (
    FakeScoreObjective,
    FieldObjective,
    clamp_key,
    dropout_key,
    eps_of,
    field_diag,
    finish_field,
    score_field,
    to_eps,
    weighting_key,
)


def fake_condition(fake, cond: torch.Tensor | None, view: torch.Tensor | None, n: int,
                   device) -> torch.Tensor | None:
    """The fake role's condition: ``(B, 2)`` ``[class, view]`` for a view-aware fake, else the class;
    ``(B, 6)`` float ``[class, view, camera]`` when the view rows carry their camera (``(B, 5)``,
    ``fake_score.camera``), the camera nulled where the view is."""
    if not getattr(fake, "takes_view", False):
        return cond
    null = torch.full((n,), NULL_CLASS, dtype=torch.long, device=device)
    # a condition that is not a class label (the (B, 4) camera of 3D runs) has no class slot here: the
    # fake reads the camera through the view
    c = cond.long().to(device) if cond is not None and cond.dim() == 1 else null
    if view is not None and view.dim() == 2:  # [view, camera] rows (fake_score.camera): the camera too
        v = view[:, 0].long().to(device)
        cam = torch.where((v < 0)[:, None], NULL_CLASS, view[:, 1:].to(device))  # dropped with the view
        return torch.cat([torch.stack([c, v], 1).to(cam.dtype), cam], 1)
    v = view.long().to(device) if view is not None else null
    return torch.stack([c, v], 1)


@dataclass
class VSDParticlesParams(ObjectiveParams):
    guidance_scale: float = 7.5        # canonical (ProlificDreamer VSD stages)
    fake_guidance_scale: float = key(1.0, "canonical CFG scale over the class on the fake, in each view branch")
    weighting: str = weighting_key()
    fake_cond_dropout: float = dropout_key()
    fake_view_dropout: float = dropout_key(0.1, "share of views the fake score's training drops (its "
                                           "view-marginal branch)")
    grad_clamp: float | None = clamp_key()


@register
class VSDParticles(FieldObjective, FakeScoreObjective):
    name = "vsd_particles"
    Params = VSDParticlesParams

    @property
    def view_lambda(self) -> float:
        return 0.0

    # -- fake score ---------------------------------------------------------------------------------
    def _fake_eps_view(self, fake, x_t, t, cond, view):
        n, dev = x_t.shape[0], x_t.device
        e_c = to_eps(fake.process, x_t, fake(x_t, t, fake_condition(fake, cond, view, n, dev)), t)
        k = self.p.fake_guidance_scale
        if k == 1.0 or cond is None:
            return e_c
        e_u = to_eps(fake.process, x_t, fake(x_t, t, fake_condition(fake, None, view, n, dev)), t)
        return e_u + k * (e_c - e_u)

    def fake_eps(self, fake, x_t, t, cond, view):
        lam = self.view_lambda
        if view is None or lam == 0.0 or not getattr(fake, "takes_view", False):
            return self._fake_eps_view(fake, x_t, t, cond, view)
        e_null = self._fake_eps_view(fake, x_t, t, cond, None)
        if lam == 1.0:
            return e_null
        return lam * e_null + (1.0 - lam) * self._fake_eps_view(fake, x_t, t, cond, view)

    def fake_condition(self, batch, roles, cond):
        view = drop_condition(batch.view, self.p.fake_view_dropout, batch.rng)
        return fake_condition(roles.fake, cond, view, batch.x.shape[0], batch.x.device)

    # -- generator field --------------------------------------------------------------------------------
    def field(self, batch, roles):
        p = roles.process
        x, t, _, x_t = self.noised(batch, p)
        e_real = eps_of(roles.teacher, x_t, t, batch.cond, self.p.guidance_scale)
        e_fake = self.fake_eps(roles.fake, x_t, t, batch.cond, batch.view)
        a, s = p.coeffs(t, x)
        g = finish_field(score_field(self.p.weighting, a, s, e_real, e_fake, "eps"), self.p.grad_clamp)
        return g, field_diag(g, t)


@dataclass
class ESDParams(VSDParticlesParams):
    view_lambda: float = key(0.5, "weight of the view-marginal fake: 1 - threestudio's guidance_scale_lora "
                             "(official recommendation 0.5)", lo=0, hi=1)


@register
class ESD(VSDParticles):
    name = "esd"
    Params = ESDParams

    @property
    def view_lambda(self) -> float:
        return float(self.p.view_lambda)
