"""What an export records about itself, and when two exports are the same.

Each version folder holds `assets.extra/export_metadata.json` and each `.keras` file a
`<model>.keras.json`: weights sha256, step count, serving limits, image shape, classes,
parameterization and schedule (the identity, `_IDENTITY_KEYS`), plus the version, dates
and library versions. An export whose identity matches the current version's is "up to
date" and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import keras
import numpy as np

from keras_progdist.diffusion import DiffusionModel
from keras_progdist.export.settings import model_name

METADATA_FILE = os.path.join("assets.extra", "export_metadata.json")
KERAS_METADATA_SUFFIX = ".json"
# Bump when the serving graph changes in a way an existing export should not hide:
# an export with another format is never "up to date".
EXPORT_FORMAT = 2
# The metadata fields that make two exports the same; the rest (version, dates,
# library versions) describe the writing, not the model served.
_IDENTITY_KEYS = ("format", "num_steps", "weights_sha256", "limits", "image_shape",
                  "num_classes", "parameterization", "schedule")


def weights_sha256(network) -> str:
    """sha256 of a network's weights: dtype, shape and bytes of each, in order.

    The identity of what a version serves, the same whether the model comes from a
    checkpoint file or from memory (a checkpoint's own sha256 also covers the
    optimizer, and a `.keras` file's bytes change with every save).
    """
    digest = hashlib.sha256()
    for weight in network.get_weights():
        array = np.ascontiguousarray(weight)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def stage_metadata(model: DiffusionModel, name: str, num_steps: int, limits: dict,
                   stage: str | None = None) -> dict:
    """What an export of `model` records about itself (`assets.extra/export_metadata.json`
    in the version folder and `<model>.keras.json` next to the `.keras` file).

    Args:
        model: the stage's `DiffusionModel`.
        name: the export name; num_steps: the stage's step count.
        limits: `serving_limits(...)`.
        stage: the work-directory stage, as `settings.model_name` reads it.

    Returns:
        A JSON-ready dict; the `_IDENTITY_KEYS` fields decide whether two exports are
        the same.
    """
    import tensorflow as tf

    return json.loads(json.dumps({
        "format": EXPORT_FORMAT,
        "name": name,
        "model_name": model_name(name, num_steps, stage),
        "num_steps": int(num_steps),
        "weights_sha256": weights_sha256(model.sampling_network),
        "limits": limits,
        "image_shape": list(model.image_shape),
        "num_classes": int(model.num_classes or 0),
        "parameterization": model.parameterization,
        "schedule": model.schedule.get_config(),
        "guided": model.guided,
        "signatures": {
            "serving_default": "seed int32 [B] (+ label) (+ guidance) -> images uint8 "
                               "[B, H, W, C]",
            "generate": "noise float32 [B, H, W, C], steps int32 [] (+ label) "
                        "(+ guidance) -> images",
            "denoise": "z float32 [B, H, W, C], t float32 [B] (+ label) (+ guidance) -> "
                       "x_hat, eps_hat"},
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }))


def same_export(recorded: dict | None, metadata: dict) -> bool:
    """Whether `recorded` (an existing export's metadata) serves what `metadata` would."""
    return isinstance(recorded, dict) and all(
        recorded.get(key) == metadata.get(key) for key in _IDENTITY_KEYS)


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        # A version from before metadata existed (or a damaged file) is "unknown
        # weights": never up to date, never overwritten without overwrite=True.
        return None


def read_version_metadata(version_dir: str) -> dict | None:
    """The `export_metadata.json` of a version folder, or None (none, or unreadable)."""
    return read_json(os.path.join(version_dir, METADATA_FILE))
