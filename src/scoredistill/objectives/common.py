"""Building blocks shared by objectives: gradient injection, normalisers, DSM and GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scoredistill.models.denoiser import NULL_CLASS, Denoiser
from scoredistill.process.processes import Process


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions, shaped ``(B, 1, ..., 1)`` for broadcasting."""
    return x.reshape(x.shape[0], -1).mean(1).view((-1,) + (1,) * (x.dim() - 1))


def inject(x: torch.Tensor, g: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Surrogate ``L = 1/2 ||x - sg(x - g)||^2`` whose gradient w.r.t. ``x`` is ``g`` (methods.md §1.4).

    ``reduction="mean"`` (DMD2, SwiftBrush): ``dL/dx = g / numel``; ``"sum_per_sample"``
    (threestudio's ``0.5 * mse(reduction="sum") / B``): ``dL/dx_i = g_i / B``, i.e. the mean over the
    batch of per-sample gradients ``g_i`` (methods.md §1.4 writes this as "``g_i`` per sample").

    A non-finite field is *not* zeroed here (the reference codes' ``nan_to_num`` hides teacher
    failures): it makes the loss non-finite, and the engine's guard skips the step and counts it.
    """
    g = g.detach()
    target = (x - g).detach()
    sq = (x - target) ** 2
    if reduction == "mean":
        return 0.5 * sq.mean()
    if reduction == "sum_per_sample":
        return 0.5 * sq.sum() / x.shape[0]
    raise ValueError(f"reduction must be 'mean' or 'sum_per_sample', got {reduction!r}")


def dm_normaliser(x: torch.Tensor, d_real: torch.Tensor, clip: float = 1e-5) -> torch.Tensor:
    """DMD's per-sample ``mean|x - D_real|`` (arXiv 2311.18828 eq. 8), detached, clipped below."""
    return per_sample_mean((x - d_real).abs()).detach().clamp(min=clip)


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
    return torch.where(drop.to(cond.device), torch.full_like(cond, NULL_CLASS), cond)


def denoising_loss(net: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                   rng: torch.Generator | None, sigma_data: float) -> torch.Tensor:
    """EDM-weighted x0 denoising score matching ``E lambda(t) ||D(a x0 + s eps, t) - x0||^2``.

    Used for the fake score (on detached generator samples) and for training toy teachers.
    """
    noise = torch.randn(x0.shape, generator=rng, dtype=x0.dtype).to(x0.device)
    x_t = net.process.add_noise(x0, noise, t)
    d = net(x_t, t, cond)
    w = edm_weight(net.process, t, sigma_data, x0)
    return (w * (d - x0) ** 2).mean()


def noise_like(x: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=rng, dtype=x.dtype).to(x.device)


def gan_logits(fake: Denoiser, head: torch.nn.Module, x: torch.Tensor, cond, t: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """Discriminator logits from the fake network's features at a re-noised input
    (DMD2's diffusion-GAN head on the fake score, arXiv 2405.14867 §4.3)."""
    x_t = fake.process.add_noise(x, noise, t)
    return head(fake.features(x_t, t, cond)).reshape(x.shape[0])


def gan_generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))``."""
    return F.softplus(-logits).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``softplus(D(x_fake)) + softplus(-D(x_real))``."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
