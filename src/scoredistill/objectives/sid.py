"""SiD and SiDA: Score identity Distillation, plain and adversarial (docs/objectives/sid.md).

SiD (arXiv 2404.04057, official ``training/sid_loss.py``). With ``x = G(z)``,
``x_t = a_t x + s_t n``, ``f_phi = D^w_real(x_t)`` and ``f_psi = D_fake(x_t)``, the generator loss per
element is

    L = (f_phi - f_psi) * ((f_phi - x) - alpha (f_phi - f_psi)) / omega,
    omega = sg(clip(mean_{non-batch} |x - f_phi|, min=1e-5)),

reduced by the mean over elements (the official code sums over elements and multiplies by
``loss_scaling_G = 100`` / batch; with Adam only the balance with other terms changes, see SiDA).
**Stop-gradients: none on f_phi or f_psi** -- autograd flows through ``x_t`` into both networks
(their parameters are frozen by the engine) and through ``x``; only ``omega`` is detached.
``alpha = 1`` is the Fisher-divergence gradient with the sampling distribution held fixed,
``alpha = 1/2`` its total derivative (checked in tests/objectives/test_sid_sim.py); the
official default is 1.2. From a randomly initialised generator ``alpha > 1`` repels samples that are
still far from the data, so ``alpha_warmup_steps`` uses ``alpha = 1`` until
``batch.step`` (the engine iteration) reaches it.

Generator time: ``t ~ U[0, 0.8]`` in the EDM process's canonical (Karras-ramp) time, which is
exactly SiD's ``sigma(u)`` with ``u ~ U[0, t_max/1000]``, ``t_max = 800`` (sigma <= ~24.4). The fake
score is trained by EDM-weighted DSM on detached samples (:class:`FakeScoreObjective`).

Few-step SiD (SiD^2, arXiv 2505.12674) trains a K-step student's uniform step mixture through the library's
backward simulation (docs/fewstep.md) and adds two guidance options for text-to-image teachers, here for any
class-conditional teacher: **Zero-CFG** (``zero_cfg``) runs the teacher unguided and the fake score without
its condition (trained and read with the null label), so ``f_phi - f_psi = D_c^teacher - D_u^fake`` carries
the guidance signal itself; **Anti-CFG** (``fake_guidance_scale`` below 1, the paper's negative scale
``kappa < 0`` in the canonical convention) reads the fake as ``D_u + kappa (D_c - D_u)``, so
``f_phi - f_psi`` gains ``(1 - kappa)(D_c - D_u)^fake``: the fake is guided *away* from the condition and
the generator toward it. ``fake_guidance_scale: 1`` is the plain conditional fake (SiD-LSG's
``cfg_eval_fake`` = kappa_2 = kappa_3, arXiv 2406.01561).

SiDA (arXiv 2410.14919, official branch ``sida``, ``sida_training/sida_loss.py``): the fake network
doubles as discriminator (here its ``features`` feed the engine's discriminator head). Generator:
``0.5 L_SiD + 0.5 (lsg_gan / lsg) mean_b[BCE(clamp(D(x_t), +-10), 1) / omega]`` with the logits taken
at the same ``x_t`` as the SiD term. Fake step: ``mean lambda(t) ||f_psi - x||^2 +
(lsd / numel) mean_b[lambda(t) (BCE(D(x_real,t), 1) + BCE(D(x_t), 0)) / 2]`` with real samples noised at the
**same t and noise** as the fake samples. The ``lsg`` and ``numel`` divisions convert the official
sum-over-elements reductions (``loss_scaling_G = 100``) to our mean reduction, so ``lsg_gan`` and
``lsd`` keep their official meaning and balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scoredistill.config import key
from scoredistill.errors import ConfigError
from scoredistill.objectives.base import Batch, ObjectiveParams, Roles, register
from scoredistill.objectives.common import drop_condition, edm_weight, head_logits, noise_like
from scoredistill.objectives.core import (
    SiDFamily,
    check_regression_rollout,
    dm_normaliser,
    drop_nonfinite,
    dropout_key,
    guidance_key,
    null_like,
    ode_regression,
    per_sample_mean,
    regression_steps_key,
    regression_weight_key,
)
from scoredistill.process.time import Uniform

SID_WEIGHTINGS = ("sid", "none")


@dataclass
class SiDParams(ObjectiveParams):
    guidance_scale: float = guidance_key()
    alpha: float = key(1.2, "official default (CIFAR-10, ImageNet-64, FFHQ); 1.0: the fixed-pi gradient")
    alpha_warmup_steps: int = key(0, "use alpha = 1 while batch.step < this (stable start from random init)",
                                  lo=0)
    weighting: str = key("sid", "sid: divide by omega (official) | none: raw x0-space loss (analysis)",
                         choices=SID_WEIGHTINGS)
    fake_cond_dropout: float = dropout_key()
    fake_guidance_scale: float = key(1.0, "canonical CFG on the fake in the generator loss; below 1 (e.g. -1): "
                                     "SiD^2 Anti-CFG")
    zero_cfg: bool = key(False, "SiD^2 Zero-CFG: teacher unguided, fake score unconditional (null label)")
    regression_weight: float = regression_weight_key(0.0, "lambda_reg of a regression on teacher ODE pairs added to "
                                                     "the generator loss (DMD's, arXiv 2311.18828; 0: off, SiD)")
    regression_steps: int = regression_steps_key()

    def validate(self):
        if self.zero_cfg and (self.guidance_scale != 1 or self.fake_guidance_scale != 1):
            raise ConfigError("objective.zero_cfg", "Zero-CFG runs the teacher unguided and the fake unconditional; "
                              "accepted with it: guidance_scale 1 and fake_guidance_scale 1")


def sid_elementwise(x: torch.Tensor, f_real: torch.Tensor, f_fake: torch.Tensor, alpha: float,
                    omega: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``(f_phi - f_psi) ((f_phi - x) - alpha (f_phi - f_psi)) / omega`` per element (nothing detached)."""
    diff = f_real - f_fake
    return diff * ((f_real - x) - alpha * diff) / omega


@register
class SiD(SiDFamily):
    name = "sid"
    Params = SiDParams
    default_time = Uniform(t_min=0.0, t_max=0.8)  # EDM: SiD's sigma(u), u ~ U[0, 800/1000]

    def requirements(self):
        req = super().requirements()
        if self.p.zero_cfg or self.p.fake_guidance_scale != 1:
            req = req | {"class_conditional"}  # the fake's conditional and unconditional branches
        if self.p.regression_weight > 0:
            req = req | {"ode_pairs"}
        return req

    def check_rollout(self, rollout, iterations: int) -> None:
        check_regression_rollout(rollout, self.p.regression_weight, self.p.regression_steps)

    def fake_prediction(self, fake, x_t, t, cond):
        if self.p.zero_cfg:
            return fake(x_t, t, null_like(cond))
        if self.p.fake_guidance_scale == 1:
            return fake(x_t, t, cond)
        return fake.guided(x_t, t, cond, self.p.fake_guidance_scale)

    def fake_condition(self, batch, roles, cond):
        return null_like(cond) if self.p.zero_cfg else cond

    def alpha_at(self, step: int) -> float:
        return 1.0 if step < self.p.alpha_warmup_steps else float(self.p.alpha)

    def omega(self, x: torch.Tensor, f_real: torch.Tensor) -> torch.Tensor:
        if self.p.weighting == "none":
            return torch.ones((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return dm_normaliser(x, f_real)  # detached, clipped at 1e-5

    def sid_loss(self, x, t, noise, cond, roles: Roles, step: int = 0, teacher_cond=None):
        """Per-sample SiD loss ``(B,)`` (mean over elements), ``x_t``, ``omega`` and both predictions."""
        x_t, f_real, f_fake = self.terms(x, t, noise, cond, roles, teacher_cond)
        om = self.omega(x, f_real)
        loss = per_sample_mean(sid_elementwise(x, f_real, f_fake, self.alpha_at(step), om)).reshape(-1)
        return loss, x_t, om, f_real, f_fake

    def per_sample_loss(self, x, t, noise, cond, roles: Roles, step: int = 0) -> tuple[torch.Tensor, dict]:
        """Per-sample SiD loss ``(B,)`` at the given ``t`` and ``noise`` (mean over elements)."""
        loss, _, om, f_real, f_fake = self.sid_loss(x, t, noise, cond, roles, step)
        gap = (f_real - f_fake).detach().flatten(1).norm(dim=1).mean()
        diag = {"omega": om.mean().detach(), "score_gap": gap}
        return loss, diag

    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        x = batch.x
        t = self.sample_t(batch, roles.process)
        noise = noise_like(x, batch.rng)
        loss, diag = self.per_sample_loss(x, t, noise, batch.cond, roles, batch.step)
        (kept,) = drop_nonfinite(loss)
        loss = kept.mean() if len(kept) else loss.sum() * 0.0
        diag = {"loss_sid": loss.detach(), "alpha": self.alpha_at(batch.step),
                "dropped": float(x.shape[0] - len(kept)), "t_mean": t.mean(), **diag}
        return {"loss": ode_regression(loss, diag, batch, roles, self.p.regression_weight, self.p.regression_steps),
                **diag}


@dataclass
class SiDAParams(SiDParams):
    alpha: float = 1.0              # official SiDA default (CIFAR-10 run_sida.sh)
    lsg_gan: float = key(0.01, "official loss_scaling_G_gan (GAN weight in the generator loss)", lo=0)
    lsd: float = key(1.0, "official loss_scaling_D (discriminator weight in the fake step)", lo=0)
    lsg: float = key(100.0, "official loss_scaling_G; only sets the GAN / SiD balance here", lo=0, lo_open=True)
    logit_clamp: float = key(10.0, "generator-side logit clamp (official)", lo=0, lo_open=True)
    gan_start_step: int = key(0, "GAN term joins the generator loss from this engine iteration", lo=0)


@register
class SiDA(SiD):
    name = "sida"
    Params = SiDAParams

    def requirements(self):
        return SiD.requirements(self) | {"discriminator", "real_data"}

    def differentiates_through(self):
        return {"teacher", "fake", "discriminator"}

    def generator_loss(self, batch: Batch, roles: Roles) -> dict:
        x = batch.x
        t = self.sample_t(batch, roles.process)
        noise = noise_like(x, batch.rng)
        l_sid, x_t, om, _, _ = self.sid_loss(x, t, noise, batch.cond, roles, batch.step)
        logits = head_logits(roles.fake, roles.discriminator, x_t, t, batch.cond)
        c = self.p.logit_clamp
        l_gan = F.softplus(-logits.clamp(-c, c)) / om.reshape(-1)  # BCE(clamp(D), 1) / omega
        l_sid, l_gan = drop_nonfinite(l_sid, l_gan)
        if not len(l_sid):
            zero = x.sum() * 0.0
            return {"loss": zero, "dropped": float(x.shape[0])}
        loss_sid, loss_gan = l_sid.mean(), l_gan.mean()
        if batch.step >= self.p.gan_start_step:
            loss = 0.5 * loss_sid + 0.5 * (self.p.lsg_gan / self.p.lsg) * loss_gan
        else:
            loss = loss_sid
        diag = {"loss_sid": loss_sid.detach(), "loss_gan_gen": loss_gan.detach(),
                "alpha": self.alpha_at(batch.step), "omega": om.mean().detach(),
                "dropped": float(x.shape[0] - len(l_sid)), "t_mean": t.mean()}
        return {"loss": ode_regression(loss, diag, batch, roles, self.p.regression_weight, self.p.regression_steps),
                **diag}

    def auxiliary_losses(self, batch: Batch, roles: Roles) -> dict:
        x, real = batch.x.detach(), batch.real
        t = self.sample_t(batch, roles.process, self.fake_time)
        noise = noise_like(x, batch.rng)
        cond = self.fake_condition(batch, roles, drop_condition(batch.cond, self.p.fake_cond_dropout, batch.rng))
        x_t = roles.process.add_noise(x, noise, t)
        lam = edm_weight(roles.process, t, getattr(roles.fake, "sigma_data", 0.5), x)
        dsm = (lam * (roles.fake(x_t, t, cond) - x) ** 2).mean()
        real_t = roles.process.add_noise(real, noise, t)  # same t and noise as the fake samples
        lf = head_logits(roles.fake, roles.discriminator, x_t, t, cond)
        lr = head_logits(roles.fake, roles.discriminator, real_t, t, batch.real_cond)
        bce = 0.5 * (F.softplus(-lr) + F.softplus(lf))  # (BCE(D(real), 1) + BCE(D(fake), 0)) / 2
        disc = (lam.reshape(-1) * bce).mean()
        numel = x[0].numel()
        loss = dsm + (self.p.lsd / numel) * disc
        return {"loss": loss, "loss_fake": dsm.detach(), "loss_disc": disc.detach(),
                "disc_acc": 0.5 * ((lf < 0).float().mean() + (lr > 0).float().mean())}
