"""The canonical denoiser contract: ``D(x_t, t, cond) -> x0_hat`` with its process attached.

Every teacher, fake score and teacher-shaped generator backbone is reachable through
:class:`Denoiser`, whatever it predicts natively; adapters convert at the edge (k-diffusion's
``external.py`` idea). Conditioning is a LongTensor of class labels with ``-1`` meaning "no
condition" (the null class of classifier-free guidance), or ``None`` for unconditional calls.
"""

from __future__ import annotations

import torch
from torch import nn

from scoredistill.process.guidance import cfg_combine
from scoredistill.process.processes import Process

NULL_CLASS = -1


class Denoiser(nn.Module):
    """Base class. Subclasses implement :meth:`denoise`; ``forward`` is an alias."""

    process: Process
    data_shape: tuple[int, ...]
    num_classes: int | None = None

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_t, t, cond=None):
        return self.denoise(x_t, t, cond)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, w: float,
               uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Canonical CFG ``D_u + w (D_c - D_u)`` (arXiv 2207.12598); one batched call of size ``2B``
        when guiding.

        ``w == 1`` (or no condition) is exactly the conditional call, so every field reduces to the
        unguided one (docs/processes.md). Samples whose label is already null are left unguided. ``uncond`` replaces the
        null labels of the unconditional branch (negative conditioning, ``D_neg + w (D_c - D_neg)``).
        """
        if cond is None or w == 1.0:
            return self.denoise(x_t, t, cond)
        null = torch.full_like(cond, NULL_CLASS) if uncond is None else uncond
        both = self.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        d_c, d_u = both.chunk(2)
        return cfg_combine(d_u, d_c, w)

    def score(self, x_t, t, cond=None):
        return self.process.score(x_t, self.denoise(x_t, t, cond), t)

    def eps(self, x_t, t, cond=None):
        return self.process.from_x0(x_t, self.denoise(x_t, t, cond), t, "eps")


def expand_t(t: torch.Tensor | float, batch: int, device=None) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` time to shape ``(B,)`` float64."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=torch.float64)
    t = t.to(device=device, dtype=torch.float64)
    return t.expand(batch) if t.dim() == 0 else t


def module_device(m: nn.Module) -> torch.device:
    """Where ``m`` computes: its first parameter's or buffer's device (CPU for parameter-free modules).

    Samplers build noise on the CPU (so seeded draws do not depend on the device) and move it here.
    An offloaded module (accelerate hooks) reports its execution device.
    """
    hook = getattr(m, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return torch.device("cpu")


class PrecondDenoiser(Denoiser):
    """EDM preconditioning around a backbone (arXiv 2206.00364 Table 1): ``D = c_skip y + c_out net(c_in y, e)``
    in float64 around the network call, where a subclass's ``_precond(x_t, t, cond)`` returns
    ``(y, c_in, c_skip, c_out, e)`` (``y`` the scaled input, ``e`` the time/class embedding). ``emb``, when
    given, is added to ``e``: an extra condition computed by the caller (a camera embedding, docs/3d.md)."""

    def denoise(self, x_t, t, cond=None, r=None, emb=None):
        # ``r``: the jump's end time of a two-time (flow-map) network; one-time networks never receive it
        y, c_in, c_skip, c_out, e = self._precond(x_t, t, cond) if r is None else self._precond(x_t, t, cond, r)
        if emb is not None:
            e = e + emb.to(e.dtype)
        f = self.net((c_in * y).to(x_t.dtype), e)
        return (c_skip * y + c_out * f.double()).to(x_t.dtype).reshape(x_t.shape)
