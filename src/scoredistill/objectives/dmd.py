"""DMD and DMD2: reverse-KL distribution matching with a learned fake score.

DMD (arXiv 2311.18828; docs/objectives/dmd.md): generator field in x0 space
``g = h (D_fake(x_t) - D^w_real(x_t)) / mean|x - D^w_real(x_t)|`` (per-sample mean, detached;
:func:`~.core.dm_field`), optionally times ``a_t`` (the paper's eq. 7; the official DMD2 code omits
it), injected with ``L = 1/2 mean ||x - sg(x - g)||^2``; plus an optional regression loss
``lambda_reg ||G(z_ref) - y_ref||^2`` on (noise, teacher-ODE output) pairs. ``h = 1`` here; the
per-sample weight ``h`` is the hook :meth:`DMD.field_weight` that f-distill overrides.
The fake score is trained by EDM-weighted denoising score matching on detached samples.

DMD2 (arXiv 2405.14867; docs/objectives/dmd2.md): DMD without regression; two time-scale updates
(the engine's ``train.generator_every`` with ``fake_on_generator_steps: true`` is the official 5:1
semantics); optional non-saturating GAN on a head over the fake network's features with
diffusion-GAN re-noising (``t ~ U[gan_t_min, gan_t_max]``), fed real samples. Stop-gradients: the DM
field is fully detached; the generator GAN term backpropagates through the frozen fake network into
``x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import (
    gan_discriminator_loss,
    gan_generator_loss,
    gan_logits,
    head_logits,
    noise_like,
)
from scoredistill.objectives.core import (
    FakeScoreObjective,
    check_regression_rollout,
    dm_field,
    dropout_key,
    guidance_key,
    inject,
    ode_regression,
    regression_steps_key,
    regression_weight_key,
)


@dataclass
class DMDParams(ObjectiveParams):
    guidance_scale: float = guidance_key()
    alpha_factor: bool = key(False, "multiply the field by a_t (DMD paper eq. 7); false: DMD2's code")
    regression_weight: float = regression_weight_key(0.25, "lambda_reg of the regression loss on teacher ODE pairs "
                                                     "(0: off)")
    regression_steps: int = regression_steps_key()
    fake_cond_dropout: float = dropout_key()


@register
class DMD(FakeScoreObjective):
    name = "dmd"
    Params = DMDParams
    # whether the discriminator head is read at the field's own x_t and t (FastGen f-distill) rather
    # than at a separate diffusion-GAN re-noising
    logits_at_field_sample: ClassVar[bool] = False

    def requirements(self):
        req = {"fake_score"}
        if self.p.regression_weight > 0:
            req.add("ode_pairs")
        return req

    def check_rollout(self, rollout, iterations: int) -> None:
        check_regression_rollout(rollout, self.p.regression_weight, self.p.regression_steps)

    def add_regression(self, loss: torch.Tensor, diag: dict, batch: Batch, roles: Roles) -> torch.Tensor:
        """:func:`~scoredistill.objectives.core.ode_regression` with this objective's ``regression_*`` keys."""
        return ode_regression(loss, diag, batch, roles, self.p.regression_weight, self.p.regression_steps)

    def field_weight(self, logits: torch.Tensor | None, t: torch.Tensor, process) -> tuple[torch.Tensor | None, dict]:
        """Per-sample weight ``h`` (detached, ``(B,)``) on the field and its diagnostics; ``None``:
        ``h = 1`` (reverse KL)."""
        return None, {}

    def dm_loss(self, batch: Batch, roles: Roles) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """The injected field, its diagnostics and the head's logits at ``x_t`` (when read there)."""
        x = batch.x
        t = self.sample_t(batch, roles.process)
        x_t = roles.process.add_noise(x, noise_like(x, batch.rng), t)  # on x's graph for a GAN term at x_t
        g, norm = dm_field(x.detach(), x_t.detach(), t, batch.cond, roles, self.p.guidance_scale, self.p.alpha_factor)
        logits = None
        if self.logits_at_field_sample:
            logits = head_logits(roles.fake, roles.discriminator, x_t, t, batch.cond)
        h, diag = self.field_weight(logits, t, roles.process)
        if h is None:
            loss = inject(x, g)
        else:
            hb = h.view((-1,) + (1,) * (x.dim() - 1)).to(x.device)
            loss = inject(x, (hb * g.double()).to(x.dtype))
        diag = {"loss_dm": loss.detach(), "field_norm": g.flatten(1).norm(dim=1).mean(),
                "normaliser": norm.mean(), "t_mean": t.mean(), **diag}
        return loss, diag, logits

    def generator_loss(self, batch, roles):
        loss, diag, _ = self.dm_loss(batch, roles)
        return {"loss": self.add_regression(loss, diag, batch, roles), **diag}


@dataclass
class DMD2Params(ObjectiveParams):
    guidance_scale: float = guidance_key()
    alpha_factor: bool = key(False, "multiply the field by a_t (DMD paper eq. 7); false: DMD2's code")
    fake_cond_dropout: float = dropout_key()
    gan_weight_gen: float = key(0.0, "generator GAN weight (DMD2: 1e-3 .. 5e-3; 0: no GAN)", lo=0)
    gan_weight_disc: float = key(1e-2, "discriminator loss weight inside the fake-network update", lo=0)
    gan_t_min: float = key(0.0, "diffusion-GAN re-noising range: lower canonical time", lo=0, hi=1)
    gan_t_max: float = key(0.5, "diffusion-GAN re-noising range: upper canonical time", lo=0, hi=1)
    regression_weight: float = regression_weight_key(0.0, "lambda_reg of DMD's regression loss on teacher ODE pairs "
                                                     "(0: off, DMD2)")
    regression_steps: int = regression_steps_key()

    def validate(self):
        if self.gan_t_min > self.gan_t_max:
            raise ConfigError("objective.gan_t_max", f"must be >= objective.gan_t_min ({self.gan_t_min}), "
                              f"got {self.gan_t_max}")


@register
class DMD2(DMD):
    name = "dmd2"
    Params = DMD2Params

    @property
    def gan(self) -> bool:
        return self.p.gan_weight_gen > 0

    def requirements(self):
        req = super().requirements()
        return req | {"discriminator", "real_data"} if self.gan else req

    def differentiates_through(self):
        return {"fake", "discriminator"} if self.gan else set()

    def _gan_t(self, batch, n, device):
        u = torch.rand(n, generator=batch.rng, dtype=torch.float64)
        return (self.p.gan_t_min + (self.p.gan_t_max - self.p.gan_t_min) * u).to(device)

    def _disc_t(self, batch: Batch, n: int, device, process) -> torch.Tensor:
        """Times of the discriminator step: where the generator side reads the head."""
        if self.logits_at_field_sample:
            return self.time(n, process, generator=batch.rng, device=device)
        return self._gan_t(batch, n, device)

    def ratio_updates(self) -> int:
        """Discriminator loss terms per fake step, each on a fresh re-noising (f-distill's estimator)."""
        return 1

    def generator_loss(self, batch, roles):
        loss, diag, logits = self.dm_loss(batch, roles)
        if self.gan:
            x = batch.x
            if logits is None:
                t = self._gan_t(batch, x.shape[0], x.device)
                logits = gan_logits(roles.fake, roles.discriminator, x, batch.cond, t, noise_like(x, batch.rng))
            gl = gan_generator_loss(logits)
            diag["loss_gan_gen"] = gl.detach()
            loss = loss + self.p.gan_weight_gen * gl
        return {"loss": self.add_regression(loss, diag, batch, roles), **diag}

    def auxiliary_losses(self, batch, roles):
        loss = self.fake_loss(batch, roles)
        out = {"loss_fake": loss.detach()}
        if self.gan:
            x, real = batch.x.detach(), batch.real
            n = self.ratio_updates()
            dl = acc = 0.0
            for _ in range(n):
                t = self._disc_t(batch, x.shape[0], x.device, roles.process)
                lf = gan_logits(roles.fake, roles.discriminator, x, batch.cond, t, noise_like(x, batch.rng))
                t_r = self._disc_t(batch, real.shape[0], real.device, roles.process)
                lr = gan_logits(roles.fake, roles.discriminator, real, batch.real_cond, t_r,
                                noise_like(real, batch.rng))
                dl = dl + gan_discriminator_loss(lf, lr)
                acc = acc + 0.5 * ((lf < 0).float().mean() + (lr > 0).float().mean())
            if n > 1:
                dl, acc = dl / n, acc / n
            out["loss_disc"] = dl.detach()
            out["disc_acc"] = acc
            loss = loss + self.p.gan_weight_disc * dl
        return {"loss": loss, **out}
