"""What callers hand the Core ML executors, checked and converted the same way for both.

``predict`` takes uint8 RGB images (N, H, W, 3); ``run`` takes arrays (or images) by input
name. Bad input is a ``ModelError`` that says what was expected (one line), in both formats.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError


def checked_pixels(pixels, height_width, model: str) -> np.ndarray:
    """``pixels`` as an array of shape (N, height, width, 3), or the ModelError saying so."""
    pixels = np.asarray(pixels)
    height, width = height_width
    if pixels.ndim != 4 or pixels.shape[1:] != (height, width, 3):
        raise ModelError(f"{model} takes images of shape (N, {height}, {width}, 3), "
                         f"not {pixels.shape}")
    return pixels


def planes(pixels: np.ndarray, color: str, name: str) -> np.ndarray:
    """RGB pixels (N, H, W, 3) → float32 (N, 3, H, W) in the model's colour order ("RGB" or
    "BGR"): a new contiguous array, which the executor owns."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ModelError(f"image input {name!r} takes (N, H, W, 3) RGB pixels, "
                         f"not {pixels.shape}")
    x = as_array(name, pixels, copy=True)
    if color == "BGR":
        x = x[..., ::-1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def as_array(name: str, value, copy: bool) -> np.ndarray:
    """Input ``name`` as a float32 array: a new one when ``copy``, else a contiguous one
    (``value`` itself when it is one); or a ModelError."""
    try:
        if copy:
            return np.array(value, dtype=np.float32)
        return np.ascontiguousarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ModelError(f"input {name!r} is not an array of numbers: {error}") from error
