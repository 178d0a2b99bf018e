"""Generators and small role modules: teacher-initialised generator, discriminator head, EMA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scoredistill.models.denoiser import Denoiser, expand_t


class DenoiserGenerator(nn.Module):
    """One-step generator ``G(z) = D(s(t_init) z, t_init)`` built from a denoiser (usually a copy
    of the teacher): the teacher's one-step prediction from pure noise at ``t_init`` (SiD uses
    ``sigma_init = 2.5``; DMD2 its maximum noise level)."""

    def __init__(self, denoiser: Denoiser, t_init: float):
        super().__init__()
        self.denoiser = denoiser
        self.t_init = float(t_init)
        self.data_shape = denoiser.data_shape
        self.num_classes = denoiser.num_classes

    def forward(self, z, cond=None):
        t = expand_t(self.t_init, z.shape[0], z.device)
        s = self.denoiser.process.sigma(t).view((-1,) + (1,) * (z.dim() - 1)).to(z.dtype)
        return self.denoiser(s * z, t, cond)


class DiscriminatorHead(nn.Module):
    """Small MLP on fake-network features -> one logit per sample (DMD2's ``cls_pred_branch``)."""

    def __init__(self, in_features: int, width: int = 128, depth: int = 1):
        super().__init__()
        self.arch = dict(in_features=in_features, width=width)
        layers = [nn.Linear(in_features, width), nn.SiLU()]
        for _ in range(depth - 1):  # built after the first layer, so depth 1 draws DMD2's head's weights
            layers += [nn.Linear(width, width), nn.SiLU()]
        if depth > 1:
            self.arch["depth"] = depth
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, h):
        return self.net(h.reshape(h.shape[0], -1))


class EMA(nn.Module):
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = float(decay)
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module):
        # one multi-tensor lerp (bit-identical to a lerp_ per parameter, tests/test_step_overhead.py)
        ema_p, p = list(self.model.parameters()), list(model.parameters())
        if ema_p:
            torch._foreach_lerp_(ema_p, p, 1.0 - self.decay)
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)
