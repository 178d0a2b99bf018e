"""Small native networks for vector data: an EDM-preconditioned MLP denoiser and an MLP generator.

Preconditioning (arXiv 2206.00364 Table 1) is applied in the VE-equivalent coordinates of any
process: with ``rho = s_t/a_t`` and ``y = x_t/a_t = x0 + rho eps``,
``D(x_t) = c_skip y + c_out F(c_in y, c_noise)``, ``c_skip = sd^2/(rho^2 + sd^2)``,
``c_out = rho sd / sqrt(rho^2 + sd^2)``, ``c_in = 1/sqrt(rho^2 + sd^2)``, ``c_noise = ln(rho)/4``.
So one network definition serves VP, EDM and flow teachers alike.

A two-time MLP (``two_time=True``, MeanFlow's student, docs/objectives/meanflow.md) also takes the end time
``r <= t`` of a jump and predicts the ``x0`` whose DDIM step from ``t`` lands where the flow map sends ``x_t``
at ``r``; the ratio ``rho(r)/rho(t)`` enters as a second embedding (``r = None``: ratio 0, the whole jump to
the data, i.e. the consistency function), so every sampler that calls ``D(x_t, t)`` uses it unchanged.
A signed-time two-time MLP (``signed_time=True``, TwinFlow's student, docs/objectives/twinflow.md) also accepts
negative times: ``D(x_t, -t, cond, -r)`` is a second branch of the same network (the flow of the student's own
samples), told apart by a time-dependent embedding added for negative times (its last layer starts at zero,
so both branches start equal); positive times compute exactly what the two-time MLP computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scoredistill.models.denoiser import NULL_CLASS, PrecondDenoiser, expand_t
from scoredistill.process.processes import Process


class FourierTime(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64.0), dim // 2)))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None] * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, width: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h, e):
        y = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(e)
        return h + self.fc2(nn.functional.silu(y))


def run_block(owner: nn.Module, blk: nn.Module, *args):
    """``blk(*args)``, under activation (gradient) checkpointing when ``owner.gradient_checkpointing`` is
    set, the module is training and autograd is recording: the block's inner activations are dropped
    after the forward and recomputed in the backward (non-reentrant ``torch.utils.checkpoint``, which
    restores the RNG and autocast state, so gradients are those of the plain forward)."""
    if owner.gradient_checkpointing and owner.training and torch.is_grad_enabled():
        return checkpoint(blk, *args, use_reentrant=False)
    return blk(*args)


class MLPBackbone(nn.Module):
    """Residual MLP ``F(x, emb)``; ``features`` is the last hidden state (DMD2's GAN head input).

    ``gradient_checkpointing`` (off by default; ``generator``/``fake_score.gradient_checkpointing`` in a
    config) recomputes each residual block in the backward pass instead of storing its activations."""

    gradient_checkpointing: bool = False

    def __init__(self, dim: int, width: int, depth: int, emb_dim: int):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResBlock(width, emb_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def features(self, x, e):
        h = self.inp(x)
        for blk in self.blocks:
            h = run_block(self, blk, h, e)
        return nn.functional.silu(self.out_norm(h))

    def forward(self, x, e):
        return self.out(self.features(x, e))


class PlainBackbone(MLPBackbone):
    """Plain MLP ``F(x, emb)``: ``depth`` SiLU layers of ``width``, the embedding added once at the input
    (``h = silu(W x + V e)``), no normalisation or skips. About 40 % of the residual backbone's compute at
    the same width and depth (3 instead of 8 width x width products at depth 4); on the toy mixtures it
    reaches a given sample quality sooner in wall time (docs/results/toy.md, "Time to quality")."""

    def __init__(self, dim: int, width: int, depth: int, emb_dim: int):
        nn.Module.__init__(self)
        self.inp = nn.Linear(dim, width)
        self.emb = nn.Linear(emb_dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, dim)

    def features(self, x, e):
        h = nn.functional.silu(self.inp(x) + self.emb(e))
        for blk in self.blocks:
            h = nn.functional.silu(run_block(self, blk, h))
        return h


#: how an MLP denoiser embeds its time: Fourier features through a 2-layer MLP (default) or the features alone
TIME_EMBEDDINGS = ("mlp", "fourier")

#: ``blocks`` of the MLP networks: the residual LayerNorm backbone (default) or the plain MLP
BACKBONES = {"residual": MLPBackbone, "plain": PlainBackbone}


def backbone(blocks: str, dim: int, width: int, depth: int, emb_dim: int) -> MLPBackbone:
    return BACKBONES[blocks](dim, width, depth, emb_dim)


class MLPDenoiser(PrecondDenoiser):
    """EDM-preconditioned MLP denoiser for flat vector data, optionally class-conditional."""

    def __init__(self, process: Process, dim: int, width: int = 256, depth: int = 4,
                 num_classes: int | None = None, sigma_data: float = 1.0, emb_dim: int = 64,
                 two_time: bool = False, signed_time: bool = False, blocks: str = "residual",
                 time_embedding: str = "mlp"):
        super().__init__()
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {time_embedding!r}")
        self.process = process
        self.data_shape = (dim,)
        self.num_classes = num_classes
        self.sigma_data = float(sigma_data)
        self.arch = dict(dim=dim, width=width, depth=depth, num_classes=num_classes,
                         sigma_data=float(sigma_data), emb_dim=emb_dim)
        self.time = FourierTime(emb_dim)
        # ``fourier``: the features go straight into the backbone's embedding layer(s), which are already linear
        # in them; the 2-layer MLP is one more (B x emb x emb) product pair and SiLU per call (docs/results/toy.md)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) \
            if time_embedding == "mlp" else nn.Identity()
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.net = backbone(blocks, dim, width, depth, emb_dim)
        if blocks != "residual":  # saved residual networks keep their former config.json
            self.arch["blocks"] = blocks
        if time_embedding != "mlp":
            self.arch["time_embedding"] = time_embedding
        nn.init.zeros_(self.net.out.weight)
        nn.init.zeros_(self.net.out.bias)
        self.two_time = bool(two_time)
        if two_time:  # built last, so one-time networks draw the same initial weights as before
            self.arch["two_time"] = True
            self.gap_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.gap_mlp[2].weight)  # starts as the one-time network of the same weights
            nn.init.zeros_(self.gap_mlp[2].bias)
        self.signed_time = bool(signed_time)
        if signed_time:
            if not two_time:
                raise ValueError("signed_time needs two_time (a flow-map network)")
            self.arch["signed_time"] = True
            self.twin_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.twin_mlp[2].weight)  # the negative-time branch starts as the positive one
            nn.init.zeros_(self.twin_mlp[2].bias)

    def _precond(self, x_t, t, cond, r=None):
        b = x_t.shape[0]
        t = expand_t(t, b, x_t.device)
        neg = None
        if self.signed_time:  # negative times: the twin branch, at the same noise level |t|
            neg, t = t < 0, t.abs()
            r = None if r is None else expand_t(r, b, x_t.device).abs()
        a = self.process.alpha(t)[:, None]
        rho = (self.process.sigma(t) / self.process.alpha(t))[:, None]
        sd = self.sigma_data
        y = x_t.reshape(b, -1).double() / a
        c_in = 1 / (rho * rho + sd * sd).sqrt()
        c_skip = sd * sd / (rho * rho + sd * sd)
        c_out = rho * sd / (rho * rho + sd * sd).sqrt()
        e = self.time_mlp(self.time((rho.squeeze(1).log() / 4).float()))
        if self.two_time:
            ratio = torch.zeros_like(rho.squeeze(1)) if r is None else \
                (self.process.rho(expand_t(r, b, x_t.device)) / rho.squeeze(1)).clamp(0.0, 1.0)
            e = e + self.gap_mlp(self.time(ratio.float()))
        if neg is not None:
            e = e + neg[:, None].to(e.dtype) * self.twin_mlp(self.time((rho.squeeze(1).log() / 4).float()))
        if self.class_emb is not None:
            idx = torch.full((b,), self.num_classes, dtype=torch.long, device=x_t.device) if cond is None \
                else torch.where(cond.long() == NULL_CLASS, self.num_classes, cond.long())
            e = e + self.class_emb(idx)
        return y, c_in, c_skip, c_out, e

    def features(self, x_t, t, cond=None):
        """Last hidden layer of the backbone at ``(x_t, t)`` (input to a discriminator head)."""
        y, c_in, _, _, e = self._precond(x_t, t, cond)
        return self.net.features((c_in * y).to(x_t.dtype), e)


class MLPGenerator(nn.Module):
    """Fresh one-step generator ``x = G(z, c)`` for vector data (residual or plain MLP, ``blocks``)."""

    def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int | None = None,
                 emb_dim: int = 64, blocks: str = "residual"):
        super().__init__()
        self.data_shape = (dim,)
        self.num_classes = num_classes
        self.arch = dict(dim=dim, width=width, depth=depth, num_classes=num_classes, emb_dim=emb_dim)
        if blocks != "residual":
            self.arch["blocks"] = blocks
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.emb_dim = emb_dim
        self.net = backbone(blocks, dim, width, depth, emb_dim)

    def forward(self, z, cond=None):
        b = z.shape[0]
        if self.class_emb is not None:
            idx = torch.full((b,), self.num_classes, dtype=torch.long, device=z.device) if cond is None \
                else torch.where(cond.long() == NULL_CLASS, self.num_classes, cond.long())
            e = self.class_emb(idx)
        else:
            # one zero row, broadcast over the batch: emb(0) is its bias exactly, so outputs and gradients are
            # those of a full (B, emb) zero input without B rows of an (emb x width) product forward and back
            e = torch.zeros(1, self.emb_dim, device=z.device, dtype=z.dtype)
        return self.net(z.reshape(b, -1), e).reshape(b, *self.data_shape)


class ResidualDenoiser(PrecondDenoiser):
    """``D(x_t) = D_base(x_t) + c_out F(c_in y, e)``: a fixed base denoiser plus the learned part of an MLP
    denoiser whose output layer starts at zero, so it starts as exactly the base. It is the trainable copy of a
    teacher without weights (an exact-score mixture): ``fake_score.kind: teacher`` on such a teacher, which
    DisBack fine-tunes from the teacher's score (docs/objectives/disback.md)."""

    def __init__(self, base: PrecondDenoiser | nn.Module, delta: MLPDenoiser):
        super().__init__()
        self.base = base
        self.delta = delta
        self.process = delta.process
        self.data_shape = delta.data_shape
        self.num_classes = delta.num_classes
        self.sigma_data = delta.sigma_data

    def _precond(self, x_t, t, cond, r=None):
        return self.delta._precond(x_t, t, cond)

    def denoise(self, x_t, t, cond=None, r=None):
        y, c_in, _, c_out, e = self._precond(x_t, t, cond)
        f = self.delta.net((c_in * y).to(x_t.dtype), e)
        base = self.base.denoise(x_t, t, cond).reshape(y.shape).double()
        return (base + c_out * f.double()).to(x_t.dtype).reshape(x_t.shape)

    def features(self, x_t, t, cond=None):
        return self.delta.features(x_t, t, cond)
