"""The train / held-out split of a bundled image dataset (shared by every dataset loader)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageSplit:
    """Images ``(N, C, H, W)`` float32 in ``[-1, 1]`` and int64 labels; ``x_test`` is the held-out split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(int(self.y_train.max()), int(self.y_test.max()))) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` images to uint8 ``0..255`` (clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
