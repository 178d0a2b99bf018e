"""Bundled datasets (offline): sklearn's 8x8 digits."""

from scoredistill.data.digits import DIGITS_SHAPE, DigitsSplit, load_digits_split, to_uint8

__all__ = ["DIGITS_SHAPE", "DigitsSplit", "load_digits_split", "to_uint8"]
