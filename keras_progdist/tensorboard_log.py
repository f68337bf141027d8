"""What a run shows in TensorBoard beyond Keras' loss curves: each stage's sample grid
(an image, step = its number of sampling steps) and the evaluation's FID/KID by step
count. TensorBoard's writer needs TensorFlow; without it (a JAX host) these are no-ops.
"""

from __future__ import annotations

import importlib.util
import os
import time

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


# The one events file `write_eval_scores` keeps in its logdir: `<prefix><time>.<suffix>`.
# TensorBoard reads any file whose name holds "tfevents"; the time keeps a newer file
# sorting after an older one, as TensorBoard expects of files it watches.
EVAL_EVENTS_PREFIX = "events.out.tfevents."
EVAL_EVENTS_SUFFIX = ".eval_scores"
_EVAL_NAMES = ("fid", "kid", "fid_se", "kid_se")
_COMPARISONS = ("delta", "ratio", "ddim_gap_share")


def eval_points(results: list) -> list:
    """The scalars `write_eval_scores` logs: sorted `(tag, step, value)`, the value
    rounded to float32 as the events file stores it."""
    points = []
    for result in results:
        values = {m: result.get(m) for m in _EVAL_NAMES}
        compared = result.get("vs_teacher") or {}
        for name in _COMPARISONS:
            values[f"{compared.get('metric')}_{name}"] = compared.get(name)
        for name, value in values.items():
            if value is not None:
                points.append((f"{result['kind']}/{name}", int(result["num_steps"]),
                               float(np.float32(value))))
    return sorted(points)


def read_scalars(path: str) -> list:
    """Every scalar of one events file: sorted `(tag, step, value)` (float32 values)."""
    import tensorflow as tf

    points = []
    # The records read as a dataset, parsed one by one: `summary_iterator` does the
    # same but prints a deprecation warning on every call, which a user cannot act on.
    for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
            number = (tf.make_ndarray(value.tensor) if value.HasField("tensor")
                      else value.simple_value)
            points.append((value.tag, int(event.step), float(np.float32(number))))
    return sorted(points)


def _is_eval_tag(tag: str) -> bool:
    """Whether `tag` is one `write_eval_scores` writes (`<kind>/<metric>`)."""
    kind, _, name = tag.partition("/")
    metric = name.split("_", 1)
    return bool(kind) and "/" not in name and (
        name in _EVAL_NAMES or (len(metric) == 2 and metric[1] in _COMPARISONS))


def write_eval_scores(logdir: str, results: list) -> bool:
    """Logs each evaluated model's FID and KID (and their standard errors, and its
    comparison with the teacher: `<metric>_delta`, `_ratio`, `_ddim_gap_share`) as
    scalars `<kind>/<name>` at its step count (teacher, undistilled `ddim`,
    `distilled`), so the curves read like the report's plot.

    Each point is logged once however often this runs (a re-run evaluation): `logdir`
    keeps one events file of scores, `events.out.tfevents.<time>.eval_scores`. When it
    already holds these very points nothing is written; otherwise a new one is written
    whole in a temporary folder, copied in atomically (`fileio.atomic_write_bytes`), and
    every earlier file of scores in `logdir` is removed: this function's own, and the
    appending kind earlier versions wrote (an events file whose every tag is a score
    tag). Other events files are left alone.

    Returns:
        Whether a new events file was written.
    """
    if not available():
        return False
    import tempfile

    import tensorflow as tf

    from keras_progdist import fileio

    points = eval_points(results)
    os.makedirs(logdir, exist_ok=True)
    ours, older, same = [], [], False
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if "tfevents" not in name or fileio.TMP_MARK in name or not os.path.isfile(path):
            continue
        try:
            scalars = read_scalars(path)
        except Exception:  # unreadable (a truncated file): ours is rewritten
            scalars = None
        if name.startswith(EVAL_EVENTS_PREFIX) and name.endswith(EVAL_EVENTS_SUFFIX):
            ours.append(path)
            same = scalars == points
        elif scalars and all(_is_eval_tag(tag) for tag, _, _ in scalars):
            older.append(path)
    if same and len(ours) == 1 and not older:
        return False
    with tempfile.TemporaryDirectory() as staging:
        writer = tf.summary.create_file_writer(staging)
        with writer.as_default():
            for tag, step, value in points:
                tf.summary.scalar(tag, value, step=step)
        writer.close()
        (written,) = [n for n in os.listdir(staging) if "tfevents" in n]
        with open(os.path.join(staging, written), "rb") as f:
            content = f.read()
    target = os.path.join(logdir, f"{EVAL_EVENTS_PREFIX}{time.time():017.6f}"
                                  f"{EVAL_EVENTS_SUFFIX}")
    fileio.atomic_write_bytes(target, content)
    for path in ours + older:
        if path != target:
            os.remove(path)
    return True
