"""Image grids as PNG files (for eyeballing samples and stages side by side)."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 `round((x + 1) * 127.5)`."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images, path: str, columns: int | None = None) -> str:
    """Writes `[B, H, W, C]` images in [-1, 1] as one PNG grid with 1-pixel gutters."""
    from PIL import Image

    pixels = to_uint8(images)
    count, height, width, channels = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 255,
                   np.uint8)
    for k in range(count):
        r, c = divmod(k, columns)
        grid[1 + r * (height + 1):1 + r * (height + 1) + height,
             1 + c * (width + 1):1 + c * (width + 1) + width] = pixels[k]
    if channels == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
