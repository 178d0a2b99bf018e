"""Training losses of the auxiliary roles: denoising score matching, condition dropout, the diffusion-GAN
head. The field math (injection, normalisers, weightings) is in :mod:`.core`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scoredistill.models.denoiser import NULL_CLASS, Denoiser
from scoredistill.process.processes import Process


def edm_weight(process: Process, t: torch.Tensor, sigma_data: float, like: torch.Tensor) -> torch.Tensor:
    """EDM loss weight ``(rho^2 + sd^2) / (rho sd)^2`` on x0 errors (arXiv 2206.00364 eq. 8)."""
    rho = process.rho(t).to(like.device)
    w = (rho * rho + sigma_data**2) / (rho * sigma_data) ** 2
    return w.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def drop_condition(cond: torch.Tensor | None, p: float, rng: torch.Generator | None) -> torch.Tensor | None:
    """Replace labels by the null class with probability ``p`` (classifier-free guidance training)."""
    if cond is None or p <= 0:
        return cond
    drop = torch.rand(cond.shape[0], generator=rng) < p
    drop = drop.reshape(-1, *([1] * (cond.dim() - 1)))  # a row per item (a (B, 4) camera is dropped whole)
    return torch.where(drop.to(cond.device), torch.full_like(cond, NULL_CLASS), cond)


def denoising_loss(net: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                   rng: torch.Generator | None, sigma_data: float, target: Denoiser | None = None) -> torch.Tensor:
    """EDM-weighted x0 denoising score matching ``E lambda(t) ||D(a x0 + s eps, t) - x0||^2``.

    Used for the fake score (on detached generator samples) and for training toy teachers. With a frozen
    ``target`` denoiser the regression target is ``target(x_t, t, cond)`` instead of ``x0``: teacher score
    matching, ``E lambda(t) ||D(x_t, t) - D_target(x_t, t)||^2`` (MSD's student initialisation, arXiv 2410.23274).
    """
    noise = torch.randn(x0.shape, generator=rng, dtype=x0.dtype).to(x0.device)
    x_t = net.process.add_noise(x0, noise, t)
    d = net(x_t, t, cond)
    w = edm_weight(net.process, t, sigma_data, x0)
    if target is not None:
        with torch.no_grad():
            x0 = target(x_t, t, cond).to(d.dtype)
    return (w * (d - x0) ** 2).mean()


def noise_like(x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=rng, dtype=x.dtype).to(x.device)


def head_logits(fake: Denoiser, head: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """Discriminator logits ``(B,)`` of a head on the fake network's features at the noisy ``x_t``."""
    return head(fake.features(x_t, t, cond)).reshape(x_t.shape[0])


def gan_logits(fake: Denoiser, head: torch.nn.Module, x: torch.Tensor, cond, t: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """Discriminator logits at a re-noised input (DMD2's diffusion-GAN head on the fake score,
    arXiv 2405.14867 §4.3)."""
    return head_logits(fake, head, fake.process.add_noise(x, noise, t), t, cond)


def gan_generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))``."""
    return F.softplus(-logits).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``softplus(D(x_fake)) + softplus(-D(x_real))``."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
