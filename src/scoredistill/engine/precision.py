"""Mixed precision: bf16 autocast for network passes, float32 (and float64 where the objectives
ask for it) for the loss math. fp16 is refused: DMD2's authors report divergence in fp16."""

from __future__ import annotations

import contextlib

import torch

from scoredistill.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


class Precision:
    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise ConfigError("train.precision", f"unknown value {name!r}; accepted: {', '.join(PRECISIONS)} "
                              "(fp16 is not offered: DMD-type training diverges in fp16)")
        self.name = name
        self.device = device

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)
