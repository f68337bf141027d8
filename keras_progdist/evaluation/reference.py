"""The real images an evaluation compares against: which they are, the key of their
features, and the features themselves (cached).

Which images: the dataset settings (`training.config.dataset_settings()`, the
`dataset.*` values as given) with `data.make_dataset`'s defaults for the rest
(`with_dataset_defaults`), and the evaluation settings' `split` and `num_reference`.
Their FID features are cached (`reference_cache`) under everything that changes them
(`reference_key`), so two settings never share an entry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os

import keras
import numpy as np

from keras_progdist import data
from keras_progdist.evaluation import reference_cache
from keras_progdist.settings import EvaluateSettings


def with_dataset_defaults(dataset: dict) -> dict:
    """The dataset settings with `data.make_dataset`'s defaults for those not given."""
    defaults = {name: p.default for name, p in
                inspect.signature(data.make_dataset).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **dataset}


def dataset_label(dataset: dict) -> tuple:
    """`(name, label)`: the dataset's name, and `<name>-<size>-<resize>`, the readable
    part of its cache entry's name and of a score's protocol."""
    dataset = with_dataset_defaults(dataset)
    name = dataset["name"]
    return name, f"{name}-{dataset.get('image_size') or 'native'}-{dataset.get('resize')}"


def _resolved(path):
    return None if path is None else os.path.realpath(os.path.expanduser(str(path)))


def reference_key(cfg: EvaluateSettings, dataset: dict) -> dict:
    """Everything that changes the real images' features: the reference cache key.

    The real images are the first `num_reference` of the split in stored order (no
    shuffle, no flip), so the evaluation seed does not enter. The backend does: its
    resize and its FID network agree with the other backend's only to ~1e-5.

    Args:
        cfg: the evaluation settings.
        dataset: the dataset settings.

    Returns:
        A JSON-able dict.
    """
    b = with_dataset_defaults(dataset)
    return {"dataset": b["name"], "data_dir": _resolved(b.get("data_dir")),
            "manual_dir": _resolved(b.get("manual_dir")), "split": cfg.split,
            "image_size": b.get("image_size"), "resize": b.get("resize"),
            "num_reference": cfg.num_reference,
            "selection": "first num_reference in stored order, no flip",
            "pixels": "uint8 round(preprocess(image))",
            "backend": keras.backend.backend()}


def reference_digest(cfg: EvaluateSettings, dataset: dict) -> str:
    """The first 16 hex digits of the sha256 of `reference_key` (a score's key holds
    this rather than the whole reference key)."""
    text = json.dumps(reference_key(cfg, dataset), sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def reference_features(fid_model, cfg: EvaluateSettings, dataset: dict,
                       verbose: int = 1) -> np.ndarray:
    """FID features of the real images, cached by `reference_key`.

    A cache entry that cannot be read (truncated, bad checksum, not a zip) is rebuilt
    with a `reference_cache.ReferenceStatsRebuiltWarning`.

    Args:
        fid_model: from `evaluation.load_fid_network()` (None: loaded when needed).
        cfg: the evaluation settings (`split`, `num_reference`, `cache_dir`, and
            `batch_size`, the feature batch).
        dataset: the dataset settings.
        verbose: 0 silent, 1 a progress bar, 2 plain lines.

    Returns:
        float32 [num_reference, 2048].
    """
    # Through the package: its network names load lazily (and tests replace them).
    from keras_progdist import evaluation

    b = with_dataset_defaults(dataset)
    name, readable = dataset_label(b)

    def build():
        real, _ = data.load_images(name, split=cfg.split, data_dir=b.get("data_dir"),
                                   manual_dir=b.get("manual_dir"),
                                   image_size=b.get("image_size"),
                                   resize=b.get("resize", "bilinear"),
                                   limit=cfg.num_reference,
                                   max_image_pixels=b["max_image_pixels"])
        if verbose:
            print(f"[eval] reference features of {len(real)} real {name} images",
                  flush=True)
        model = fid_model if fid_model is not None else evaluation.load_fid_network()
        return evaluation.compute_features(model, real, batch_size=cfg.batch_size,
                                           verbose=verbose == 1)

    stats = reference_cache.cached_reference_stats(
        readable, f"{cfg.split}-n{cfg.num_reference}", build,
        key=reference_key(cfg, b), cache_dir=cfg.cache_dir)
    if verbose >= 2 and stats["built"]:
        print(f"[eval] reference statistics cached in {stats['path']}", flush=True)
    return stats["features"]
