"""SFD: Score Forgetting Distillation (arXiv 2409.11219; docs/objectives/sfd.md; official
``tqch/score-forgetting-distillation`` DDPM/runners/diffusion.py ``train_sfd``, functions/losses.py).

SiD (see :mod:`.sid`) on a class-conditional teacher, plus a *forget* term that is SiD with a
mismatched teacher condition: the generator's samples of the forget class ``c_f`` are scored by the
teacher at an override class ``c_o`` and by the fake score at ``c_f``, so the generator's ``c_f``
distribution is matched to the teacher's ``c_o`` distribution.

* **Generator:** ``L_G = L_SiD(x, teacher c, fake c)`` over the batch samples of the remaining classes
  ``+ forget_weight * L_SiD(G(z, c_f), teacher c_o, fake c_f)``; ``omega`` from the teacher's
  (override-class) prediction, nothing detached but omega (as SiD). The forget samples are a second
  full batch ``G(z, c_f)`` on the same noise ``z`` (official: a separate batch of the same size).
* **Fake score:** ``L_psi = L_DSM(remaining-class samples) + fake_forget_weight * L_DSM(G(z, c_f), c_f)``
  on detached samples.
* ``override_class: null`` draws a random non-forget class per sample (official
  ``pseudo_label_type: rand``). ``forget_warmup_steps``: during the first steps the forget terms
  draw t from U[0.02, 0.98] instead of the method's range (official ``forget_warmup``).
* Defaults (CIFAR-10 config): ``forget_weight = fake_forget_weight = 0.01``, alpha 1.2, no condition
  dropout on the fake (``cond_drop_prob: 0.0``); the fake score's DSM times come from the same range
  as the generator's (official ``randint(t_min, t_max)`` in both updates), here ``U[0, 0.8]``.
* The engine's batch draws labels from every class; the forget-class samples in it are left out of
  the remaining-class terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch, Roles, register
from scoredistill.objectives.common import denoising_loss, noise_like
from scoredistill.objectives.core import class_key, drop_nonfinite, dropout_key
from scoredistill.objectives.sid import SiD, SiDParams
from scoredistill.process.time import Uniform

WARMUP_TIME = Uniform(t_min=0.02, t_max=0.98)  # official: randint(20, 980) during forget_warmup


@dataclass
class SFDParams(SiDParams):
    forget_class: int = class_key(0, "the class to forget")
    override_class: int | None = class_key(1, "the class its samples are steered to (official CIFAR-10 "
                                           "label_to_override); null: a random other class per sample")
    forget_weight: float = key(0.01, "weight of the forget term in the generator loss (g_forget_coef)", lo=0)
    fake_forget_weight: float = key(0.01, "weight of the forget term in the fake step (sg_forget_coef)", lo=0)
    forget_warmup_steps: int = key(0, "forget terms draw t from U[0.02, 0.98] during these steps", lo=0)
    fake_cond_dropout: float = dropout_key(0.0, "official cond_drop_prob")

    def validate(self):
        if self.override_class == self.forget_class:
            raise ConfigError("objective.override_class", "must differ from objective.forget_class")
        if self.regression_weight > 0:
            raise ConfigError("objective.regression_weight", "sfd has no regression term; accepted: 0")


@register
class SFD(SiD):
    name = "sfd"
    Params = SFDParams
    # official SFD draws the fake-score DSM times from the generator's range [t_min, t_max) (DDPM
    # ``randint(t_min, t_max)`` in both updates), not SiD's log-normal
    default_fake_time = Uniform(t_min=0.0, t_max=0.8)

    def requirements(self):
        return {"fake_score", "class_conditional"}

    def _check(self, roles: Roles, cond):
        k = getattr(roles.teacher, "num_classes", None) or 0
        if cond is None or k < 2:
            raise ConfigError("teacher", "objective sfd needs a class-conditional teacher with >= 2 classes")
        for name in ("forget_class", "override_class"):
            v = getattr(self.p, name)
            if v is not None and v >= k:
                raise ConfigError(f"objective.{name}", f"must be a label of the teacher (0..{k - 1}), got {v}")

    def _forget_time(self, batch: Batch, process, sampler):
        s = WARMUP_TIME if batch.step < self.p.forget_warmup_steps else sampler
        return s(batch.x.shape[0], process, generator=batch.rng, device=batch.x.device)

    def override_labels(self, cond: torch.Tensor, num_classes: int, rng) -> torch.Tensor:
        """``c_o`` per forget sample: the fixed override class, or a random class other than ``c_f``."""
        if self.p.override_class is not None:
            return torch.full_like(cond, self.p.override_class)
        r = torch.randint(0, num_classes - 1, cond.shape, generator=rng).to(cond.device)
        return r + (r >= self.p.forget_class).long()

    def forget_loss(self, x_f: torch.Tensor, c_f: torch.Tensor, c_o: torch.Tensor, t, noise, roles: Roles,
                    step: int) -> tuple[torch.Tensor, dict]:
        """Per-sample SiD loss of ``x_f = G(z, c_f)`` with the teacher at ``c_o`` and the fake at ``c_f``."""
        loss, _, om, _, _ = self.sid_loss(x_f, t, noise, c_f, roles, step, teacher_cond=c_o)
        return loss, {"omega_forget": om.mean().detach()}

    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        self._check(roles, batch.cond)
        x, cond = batch.x, batch.cond
        keep = cond != self.p.forget_class
        t = self.sample_t(batch, roles.process)
        noise = noise_like(x, batch.rng)
        zero = x.sum() * 0.0
        loss_remain, diag = zero, {}
        if bool(keep.any()):
            l_remain, diag = self.per_sample_loss(x[keep], t[keep], noise[keep], cond[keep], roles, batch.step)
            (l_remain,) = drop_nonfinite(l_remain)
            loss_remain = l_remain.mean() if len(l_remain) else zero
        # forget term on a second batch G(z, c_f) with the graph of the generator
        c_f = torch.full_like(cond, self.p.forget_class)
        c_o = self.override_labels(c_f, roles.teacher.num_classes, batch.rng)
        x_f = roles.generator(batch.z, c_f)
        t_f = self._forget_time(batch, roles.process, self.time)
        l_forget, fdiag = self.forget_loss(x_f, c_f, c_o, t_f, noise_like(x_f, batch.rng), roles, batch.step)
        (l_forget,) = drop_nonfinite(l_forget)
        loss_forget = l_forget.mean() if len(l_forget) else zero
        loss = loss_remain + self.p.forget_weight * loss_forget
        return {"loss": loss, "loss_sid": loss_remain.detach(), "loss_forget": loss_forget.detach(),
                "alpha": self.alpha_at(batch.step), "t_mean": t.mean(), **diag, **fdiag}

    def auxiliary_losses(self, batch: Batch, roles: Roles) -> dict:
        self._check(roles, batch.cond)
        cond = batch.cond
        keep = cond != self.p.forget_class
        sub = Batch(x=batch.x.detach()[keep], cond=cond[keep], rng=batch.rng, step=batch.step)
        l_remain = self.fake_loss(sub, roles) if bool(keep.any()) else batch.x.sum() * 0.0
        c_f = torch.full_like(cond, self.p.forget_class)
        with torch.no_grad():
            x_f = roles.generator(batch.z, c_f).detach()
        t_f = self._forget_time(batch, roles.process, self.fake_time)
        sd = getattr(roles.fake, "sigma_data", 0.5)
        l_forget = denoising_loss(roles.fake, x_f, c_f, t_f, batch.rng, sd)
        loss = l_remain + self.p.fake_forget_weight * l_forget
        return {"loss": loss, "loss_fake": l_remain.detach(), "loss_fake_forget": l_forget.detach()}
