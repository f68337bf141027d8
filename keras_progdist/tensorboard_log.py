"""What a run shows in TensorBoard beyond Keras' loss curves: each stage's sample grid
(an image, step = its number of sampling steps) and the evaluation's FID/KID by step
count. TensorBoard's writer needs TensorFlow; without it (a JAX host) these are no-ops.
"""

from __future__ import annotations

import importlib.util

import numpy as np


def available() -> bool:
    """Whether TensorFlow and TensorBoard are installed (the writers need both)."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("tensorflow", "tensorboard"))


def write_image(logdir: str, tag: str, png_path: str, step: int) -> bool:
    """Logs a PNG (e.g. a stage's sample grid) as image `tag` at `step`.

    Returns:
        Whether anything was written.
    """
    if not available():
        return False
    import tensorflow as tf
    from PIL import Image

    with Image.open(png_path) as im:
        pixels = np.asarray(im.convert("RGB"))[None]
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.image(tag, pixels, step=int(step))
    writer.close()
    return True


def write_eval_scores(logdir: str, results: list) -> bool:
    """Logs each evaluated model's FID and KID (and their standard errors, and its
    comparison with the teacher: `<metric>_delta`, `_ratio`, `_ddim_gap_share`) as
    scalars `<kind>/<name>` at its step count (teacher, undistilled `ddim`,
    `distilled`), so the curves read like the report's plot.

    Returns:
        Whether anything was written.
    """
    if not available():
        return False
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for result in results:
            values = {m: result.get(m) for m in ("fid", "kid", "fid_se", "kid_se")}
            compared = result.get("vs_teacher") or {}
            for name in ("delta", "ratio", "ddim_gap_share"):
                values[f"{compared.get('metric')}_{name}"] = compared.get(name)
            for name, value in values.items():
                if value is not None:
                    tf.summary.scalar(f"{result['kind']}/{name}", float(value),
                                      step=int(result["num_steps"]))
    writer.close()
    return True
