"""A small convolutional UNet denoiser for images, EDM-preconditioned through the Denoiser contract.

Same preconditioning as :class:`~scoredistill.models.mlp.MLPDenoiser` (arXiv 2206.00364 Table 1) in
the VE-equivalent coordinates of any process (``rho = s_t/a_t``, ``y = x_t/a_t``):
``D(x_t) = c_skip y + c_out F(c_in y, c_noise)`` with ``c_noise = ln(rho)/4``.

Architecture: one resolution level per entry of ``channels`` (``channels[0]`` at full size, each
further level at half the size of the one above, rounded up: two levels ``(32, 64)`` for the 8x8
digits, three ``(16, 32, 48)`` for 28x28 MNIST at 28 -> 14 -> 7), residual blocks with GroupNorm +
SiLU and an additive embedding of (noise level + class), no attention. Class-conditional with the
null class ``-1`` (classifier-free guidance), mapped to an extra embedding row.
:meth:`UNetDenoiser.features` returns the bottleneck activations (flattened), the input of DMD2's
GAN head / SiDA's discriminator.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from scoredistill.models.denoiser import NULL_CLASS, PrecondDenoiser, expand_t
from scoredistill.models.mlp import FourierTime, run_block
from scoredistill.process.processes import Process


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ConvResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _level_name(base: str, i: int) -> str:
    """Module names of the per-level down/up convolutions: ``down``/``up`` for level 1 (the names of
    the original two-level network, so its checkpoints load unchanged), ``down2``/``up2``, … below."""
    return base if i == 1 else f"{base}{i}"


class UNetBackbone(nn.Module):
    """``F(x, emb)`` on ``(B, C, H, W)``; one resolution level per entry of ``channels``, skip connections.

    Level 0 runs at full size with ``channels[0]``; each further level halves the size with a stride-2
    convolution (``ceil(H / 2)``, so odd sizes work: 28 -> 14 -> 7 -> 4) and switches to
    ``channels[i]``. The decoder upsamples by nearest-neighbour interpolation to the exact size of the
    matching skip activation. Two levels are the bundled digits network (module names unchanged).

    ``gradient_checkpointing`` (off by default) recomputes each residual block in the backward pass
    instead of storing its activations (``run_block``: only while training with autograd recording)."""

    gradient_checkpointing: bool = False

    def __init__(self, in_ch: int, channels: tuple[int, ...], emb_dim: int, dropout: float = 0.0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1:
            raise ValueError("channels needs at least one entry")
        self.levels = len(channels)
        c0 = channels[0]
        self.conv_in = nn.Conv2d(in_ch, c0, 3, padding=1)
        self.enc0 = ConvResBlock(c0, c0, emb_dim, dropout)
        for i in range(1, self.levels):
            prev, cur = channels[i - 1], channels[i]
            self.add_module(_level_name("down", i), nn.Conv2d(prev, prev, 3, stride=2, padding=1))
            self.add_module(f"enc{i}", ConvResBlock(prev, cur, emb_dim, dropout))
        last = channels[-1]
        self.mid = ConvResBlock(last, last, emb_dim, dropout)
        for i in reversed(range(self.levels)):
            cur, prev = channels[i], channels[max(i - 1, 0)]
            self.add_module(f"dec{i}", ConvResBlock(cur + cur, cur, emb_dim, dropout))
            self.add_module(f"dec{i}b", ConvResBlock(cur + prev, cur, emb_dim, dropout))
            if i > 0:
                self.add_module(_level_name("up", i), nn.Conv2d(cur, prev, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(c0), c0)
        self.conv_out = nn.Conv2d(c0, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def encode(self, x, e):
        """Bottleneck activations and the skip activations ``(in_0, enc_0, down_1, enc_1, …)``."""
        h = self.conv_in(x)
        skips = [h]
        h = run_block(self, self.enc0, h, e)
        skips.append(h)
        for i in range(1, self.levels):
            h = getattr(self, _level_name("down", i))(h)
            skips.append(h)
            h = run_block(self, getattr(self, f"enc{i}"), h, e)
            skips.append(h)
        return run_block(self, self.mid, h, e), tuple(skips)

    def forward(self, x, e):
        h, skips = self.encode(x, e)
        for i in reversed(range(self.levels)):
            h = run_block(self, getattr(self, f"dec{i}"), torch.cat([h, skips[2 * i + 1]], 1), e)
            h = run_block(self, getattr(self, f"dec{i}b"), torch.cat([h, skips[2 * i]], 1), e)
            if i > 0:
                h = F.interpolate(h, size=skips[2 * i - 1].shape[-2:], mode="nearest")
                h = getattr(self, _level_name("up", i))(h)
        return self.conv_out(F.silu(self.out_norm(h)))


class UNetDenoiser(PrecondDenoiser):
    """EDM-preconditioned small UNet for ``(C, H, W)`` images, optionally class-conditional.

    ``cond`` is a LongTensor of labels in ``[0, num_classes)`` or ``-1`` (null), or ``None`` (all null).
    """

    def __init__(self, process: Process, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 channels: tuple[int, ...] | list[int] = (32, 64), num_classes: int | None = None,
                 sigma_data: float = 0.5, emb_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        image_shape = tuple(int(v) for v in image_shape)
        channels = tuple(int(v) for v in channels)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W); got {image_shape}")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths; got {channels}")
        self.process = process
        self.data_shape = image_shape
        self.num_classes = num_classes
        self.sigma_data = float(sigma_data)
        self.arch = dict(image_shape=list(image_shape), channels=list(channels), num_classes=num_classes,
                         sigma_data=float(sigma_data), emb_dim=emb_dim, dropout=dropout)
        self.time = FourierTime(emb_dim)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.net = UNetBackbone(image_shape[0], channels, emb_dim, dropout)

    def _precond(self, x_t, t, cond):
        b = x_t.shape[0]
        t = expand_t(t, b, x_t.device)
        a = self.process.alpha(t).view(-1, 1, 1, 1)
        rho = (self.process.sigma(t) / self.process.alpha(t)).view(-1, 1, 1, 1)
        sd = self.sigma_data
        y = x_t.reshape(b, *self.data_shape).double() / a
        c_in = 1 / (rho * rho + sd * sd).sqrt()
        c_skip = sd * sd / (rho * rho + sd * sd)
        c_out = rho * sd / (rho * rho + sd * sd).sqrt()
        dtype = x_t.dtype if x_t.dtype.is_floating_point else torch.float32
        e = self.time_mlp(self.time((rho.view(b).log() / 4).to(dtype)))
        if self.class_emb is not None:
            if cond is None:
                idx = torch.full((b,), self.num_classes, dtype=torch.long, device=x_t.device)
            else:
                cond = cond.long().to(x_t.device)
                idx = torch.where(cond == NULL_CLASS, torch.full_like(cond, self.num_classes), cond)
            e = e + self.class_emb(idx)
        return y, c_in, c_skip, c_out, e

    def features(self, x_t, t, cond=None):
        """Bottleneck activations at ``(x_t, t)``, flattened to ``(B, channels[-1] * h * w)``
        (``h, w``: the size of the lowest level, e.g. 4x4 for 8x8 digits, 7x7 for 28x28 MNIST)."""
        y, c_in, _, _, e = self._precond(x_t, t, cond)
        h, _ = self.net.encode((c_in * y).to(x_t.dtype), e)
        return F.silu(h).reshape(h.shape[0], -1)
