"""Classifier-free guidance in one canonical form (docs/processes.md, "Classifier-free guidance").

Canonical: ``D^w = D_u + w (D_c - D_u)``; ``w = 1`` is the unguided conditional model, ``w = 0``
the unconditional one. Code bases that write ``D_c + s (D_c - D_u)`` (threestudio SDS, Consistent3D,
CausVid/Self-Forcing) mean ``w = 1 + s``: convert with :func:`from_cond_plus` at config load, never
inside a loss.
"""

from __future__ import annotations

import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """``uncond + w * (cond - uncond)`` (canonical CFG, arXiv 2207.12598)."""
    return uncond + w * (cond - uncond)


def from_cond_plus(s: float) -> float:
    """Convert a ``cond + s (cond - uncond)`` guidance scale to the canonical ``w = 1 + s``."""
    return 1.0 + float(s)


def to_cond_plus(w: float) -> float:
    """Inverse of :func:`from_cond_plus`."""
    return float(w) - 1.0


GUIDANCE_CONVENTIONS = ("canonical", "cond_plus")


def canonical_scale(value: float, convention: str = "canonical") -> float:
    """Read a guidance scale written in ``convention`` and return it in canonical form."""
    if convention == "canonical":
        return float(value)
    if convention == "cond_plus":
        return from_cond_plus(value)
    raise ValueError(f"guidance convention must be one of {', '.join(GUIDANCE_CONVENTIONS)}; got {convention!r}")
