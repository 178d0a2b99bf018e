"""sklearn's 8x8 handwritten digits (1797 images, shipped inside the scikit-learn wheel).

Split: stratified by class with ``random_state=0`` into 1200 training images (teacher and metric
classifier) and 597 held-out images (the reference of the Fréchet distance). Pixels 0..16 are scaled
to ``[-1, 1]``; tensors have shape ``(N, 1, 8, 8)``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from scoredistill.data.split import ImageSplit, to_uint8

DIGITS_SHAPE = (1, 8, 8)
N_TRAIN = 1200
N_HELD_OUT = 597


DigitsSplit = ImageSplit  # (1200, 1, 8, 8) training / (597, 1, 8, 8) held-out images, 10 classes


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


__all__ = ["DIGITS_SHAPE", "N_HELD_OUT", "N_TRAIN", "DigitsSplit", "load_digits_split", "to_uint8"]
