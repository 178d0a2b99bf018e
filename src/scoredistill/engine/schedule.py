"""Learning-rate schedules: one factor per iteration, shared by every role's optimizer.

The factor is a pure function of the iteration, so a resumed run continues the same curve; the
``LambdaLR`` states are checkpointed as well so a checkpoint records the learning rates it used.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, schedule: str = "constant", warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based) of ``total``.

    Warm-up is linear, ``(step + 1) / warmup``, so the first update already moves; the decay runs over
    the whole of ``total`` (warm-up included) to ``min_ratio``: cosine ``m + (1 - m)(1 + cos(pi s/T))/2``
    or linear ``1 - (1 - m) s/T``.
    """
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "cosine":
        d = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    elif schedule == "linear":
        d = 1.0 - (1.0 - min_ratio) * frac
    else:
        d = 1.0
    return w * d


def build_schedulers(optimizers: dict, tc: dict) -> dict:
    """A ``LambdaLR`` per optimizer, or none when the schedule is constant without warm-up (so the
    default path has no scheduler at all)."""
    if tc["lr_schedule"] == "constant" and not tc["warmup_steps"]:
        return {}

    def fn(step, total=tc["steps"], s=tc["lr_schedule"], w=tc["warmup_steps"], m=tc["lr_min_ratio"]):
        return lr_factor(step, total, s, w, m)

    return {name: torch.optim.lr_scheduler.LambdaLR(opt, fn) for name, opt in optimizers.items()}
