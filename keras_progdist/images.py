"""Image grids as PNG files (for eyeballing samples and stages side by side)."""

from __future__ import annotations

import io
import math
import os

import numpy as np

# Grids of 16x16 or 32x32 samples are a few dozen pixels wide; viewers then blur or
# shrink them. Upscaling by a whole factor with nearest-neighbour keeps every sample
# pixel a crisp square block, so nothing is invented or smoothed.
MIN_GRID_SIZE = 256


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 `round((x + 1) * 127.5)` (uint8 input is returned as is).

    Args:
        images: float array in [-1, 1], or uint8.

    Returns:
        uint8 array of the same shape. The float arithmetic is float32, the same
        as the FID network's own quantisation, so stored samples score as the
        floats they came from.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    images = images.astype(np.float32)
    return np.clip(np.round((images + np.float32(1.0)) * np.float32(127.5)), 0, 255) \
        .astype(np.uint8)


def grid(images, columns: int | None = None, min_size: int = MIN_GRID_SIZE) -> np.ndarray:
    """`[B, H, W, C]` images as one uint8 grid with 1-pixel white gutters.

    Args:
        images: floats in [-1, 1] or uint8.
        columns: images per row (default: about square).
        min_size: the grid is enlarged by the smallest whole factor that makes its
            longer side at least this many pixels (nearest-neighbour); 0 or 1 keeps
            it at one pixel per sample pixel.

    Returns:
        uint8 `[rows, cols]` for one channel, else `[rows, cols, C]`.
    """
    pixels = to_uint8(images)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    count, height, width, channels = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    out = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 255,
                  np.uint8)
    for k in range(count):
        r, c = divmod(k, columns)
        out[1 + r * (height + 1):1 + r * (height + 1) + height,
            1 + c * (width + 1):1 + c * (width + 1) + width] = pixels[k]
    factor = max(1, math.ceil(min_size / max(out.shape[:2]))) if min_size else 1
    if factor > 1:
        out = np.repeat(np.repeat(out, factor, axis=0), factor, axis=1)
    return out[..., 0] if channels == 1 else out


def save_grid(images, path: str, columns: int | None = None,
              min_size: int = MIN_GRID_SIZE) -> str:
    """Writes `[B, H, W, C]` images as one PNG grid, at least `min_size` px on the long side.

    Args:
        images: floats in [-1, 1] or uint8.
        path: the PNG to write (atomically; folders are created).
        columns, min_size: see `grid`.

    Returns:
        `path`.
    """
    from PIL import Image

    from keras_progdist import fileio

    buffer = io.BytesIO()
    Image.fromarray(grid(images, columns, min_size)).save(buffer, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fileio.atomic_write_bytes(path, buffer.getvalue())
    return path
