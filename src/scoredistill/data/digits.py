"""sklearn's 8x8 handwritten digits (1797 images, shipped inside the scikit-learn wheel).

Split: stratified by class with ``random_state=0`` into 1200 training images (teacher and metric
classifier) and 597 held-out images (the reference of the Fréchet distance). Pixels 0..16 are scaled
to ``[-1, 1]``; tensors have shape ``(N, 1, 8, 8)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DIGITS_SHAPE = (1, 8, 8)
N_TRAIN = 1200
N_HELD_OUT = 597


@dataclass(frozen=True)
class DigitsSplit:
    x_train: torch.Tensor  # (1200, 1, 8, 8) float32 in [-1, 1]
    y_train: torch.Tensor  # (1200,) int64
    x_test: torch.Tensor   # (597, 1, 8, 8)
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return 10


@lru_cache(maxsize=1)
def _split() -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, train_size=N_TRAIN, test_size=N_HELD_OUT,
                                              stratify=y, random_state=0)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return DigitsSplit(as_t(x_tr[:, None]), as_t(y_tr), as_t(x_te[:, None]), as_t(y_te))


def load_digits_split() -> DigitsSplit:
    """The fixed train / held-out split (cached; callers must not modify the tensors in place)."""
    return _split()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` images to uint8 ``0..255`` (clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
