"""SwiftBrush (arXiv 2312.05239) and SNOOPI's PG-SB random guidance (arXiv 2412.02687);
docs/objectives/swiftbrush.md.

SwiftBrush is VSD for a one-step generator (official ``train_swiftbrush.py``): field in epsilon space

    g = s_t^2 (eps^w_real(x_t) - eps^w_fake(x_t)),   i.e. in x0 space  g = a_t s_t (D^w_fake - D^w_real)

(:class:`~.vsd.VSD`), with classifier-free guidance applied to **both** the teacher and the fake score
("LoRA teacher") with the **same** canonical scale ``w`` (unconditional branch = null label), fully
detached, injected with the mean-reduced surrogate ``1/2 mean||x - sg(x - g)||^2``; t ~ U[0.02, 0.98].

* **PG-SB** (SNOOPI): ``guidance_scale_range: [lo, hi]`` draws one ``w ~ U[lo, hi]`` per training step
  and uses that same ``w`` for the teacher and the fake score. The range per backbone is not published;
  choose it per teacher.
* **Negative conditioning** (``negative_class``, class-conditional teachers): the prediction for that
  class replaces the teacher's unconditional branch, ``D_neg + w (D_c - D_neg)`` (``Denoiser.guided``
  with ``uncond``). Only the teacher is
  changed (as FastGen's ``neg_condition``); the fake score keeps its null-label branch, since it models
  the student's own distribution. (SNOOPI's NASA acts inside attention layers at inference and has no
  analogue for these networks.)
* **Fake score**: trained on detached samples with 10 % null-label dropout (its unconditional branch
  is needed for CFG on the fake). ``fake_weighting: edm`` is the library's EDM-weighted x0 DSM;
  ``eps`` is SwiftBrush's ``mean||a_t (eps_fake - eps)||^2`` = ``a_t^4/s_t^2 ||D_fake - x||^2``
  (mean over elements), t ~ U over the full range. Both have the same minimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import drop_condition, noise_like
from scoredistill.objectives.core import class_key, dropout_key, guidance_key, weighting_key
from scoredistill.objectives.vsd import VSD

FAKE_WEIGHTINGS = ("edm", "eps")


@dataclass
class SwiftBrushParams(ObjectiveParams):
    guidance_scale: float = guidance_key(4.5, "canonical w on the teacher and the fake (SwiftBrush README, SD2.1)")
    guidance_scale_range: list[float] | None = key(None, "PG-SB: [lo, hi], one w ~ U[lo, hi] per step", lo=0,
                                                   length=2)
    negative_class: int | None = class_key(None, "label whose prediction replaces the teacher's uncond branch")
    weighting: str = weighting_key()
    fake_cond_dropout: float = dropout_key()
    fake_weighting: str = key("edm", "edm | eps (SwiftBrush's alpha-bar weighted eps-MSE)", choices=FAKE_WEIGHTINGS)

    def validate(self):
        r = self.guidance_scale_range
        if r is not None:
            if r[0] > r[1]:
                raise ConfigError("objective.guidance_scale_range", f"must be [lo, hi] with lo <= hi, got {r!r}")
            self.guidance_scale_range = [float(r[0]), float(r[1])]


@register
class SwiftBrush(VSD):
    name = "swiftbrush"
    Params = SwiftBrushParams

    def requirements(self):
        req = {"fake_score"}
        if self.p.negative_class is not None:
            req.add("class_conditional")
        return req

    def draw_w(self, batch: Batch) -> float:
        """This step's guidance scale: fixed, or PG-SB's ``U[lo, hi]`` (one draw per step)."""
        r = self.p.guidance_scale_range
        if r is None:
            return float(self.p.guidance_scale)
        u = float(torch.rand((), generator=batch.rng, dtype=torch.float64))
        return r[0] + (r[1] - r[0]) * u

    def _check_negative(self, roles: Roles):
        n = self.p.negative_class
        k = getattr(roles.teacher, "num_classes", None)
        if n is not None and (not k or n >= k):
            raise ConfigError("objective.negative_class",
                              f"needs a class-conditional teacher with label {n}; teacher has "
                              f"{k or 'no'} classes")

    def scales(self, batch: Batch):
        w = self.draw_w(batch)
        return w, w, {"w": w}  # the same w on the fake (SwiftBrush)

    def teacher_x0(self, roles: Roles, x_t, t, cond, w: float) -> torch.Tensor:
        n = self.p.negative_class
        if n is None or cond is None:
            return roles.teacher.guided(x_t, t, cond, w)
        return roles.teacher.guided(x_t, t, cond, w, uncond=torch.full_like(cond, n))

    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        self._check_negative(roles)
        return super().generator_loss(batch, roles)

    def fake_loss(self, batch: Batch, roles: Roles) -> torch.Tensor:
        if self.p.fake_weighting == "edm":
            return super().fake_loss(batch, roles)
        x = batch.x.detach()
        t = self.sample_t(batch, roles.process, self.fake_time)
        cond = drop_condition(batch.cond, self.p.fake_cond_dropout, batch.rng)
        x_t = roles.process.add_noise(x, noise_like(x, batch.rng), t)
        a, s = roles.process.coeffs(t, x)
        lam = (a.double() ** 4 / s.double() ** 2).to(x.dtype)  # ||a (eps_hat - eps)||^2 in x0 units
        return (lam * (roles.fake(x_t, t, cond) - x) ** 2).mean()
