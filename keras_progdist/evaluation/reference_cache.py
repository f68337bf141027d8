"""The cache of real-data reference statistics: one checksummed npz per key.

An entry holds the mean, covariance and (optionally) the features of the real images
of one (dataset, split, feature protocol, key), where the key is everything else that
changes those images (`evaluation.reference.reference_key`). Its file name hashes all
of them, so two settings never share or overwrite an entry; a `sha256` inside covers
every other array, so a damaged entry is detected on load and rebuilt
(`cached_reference_stats`). Numpy only.

Layout: `<cache_dir>/fid_reference_stats/<dataset>__<split>__<sha16>.npz`.
"""

import hashlib
import json
import os
import re
import warnings
import zipfile

import numpy as np

from keras_progdist import fileio
from keras_progdist.errors import KerasProgdistError
from keras_progdist.evaluation.caches import default_cache_dir
from keras_progdist.evaluation.metrics import FID_PROTOCOL, feature_statistics

_REFERENCE_STATS_FOLDER = "fid_reference_stats"


class ReferenceStatsNotFoundError(KerasProgdistError, FileNotFoundError):
    """No cached reference statistics for this dataset, split and protocol."""


class CorruptReferenceStatsError(KerasProgdistError, ValueError):
    """A cached reference-statistics file cannot be read or fails its checksum."""


class ReferenceStatsRebuiltWarning(UserWarning):
    """A cached reference-statistics file was unreadable and is being rebuilt."""


def _slug(text):
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-.")
    if not slug:
        raise ValueError(f"{text!r} is not usable in a file name")
    return slug


def _canonical_key(protocol, key):
    # The file name hashes everything that changes the cached numbers, so two
    # settings (say two data_dirs) can never share or overwrite one entry.
    if key is None:
        return protocol  # the original layout: protocol only
    return json.dumps({"protocol": protocol, "key": key}, sort_keys=True,
                      separators=(",", ":"), default=str)


def reference_stats_path(dataset, split, protocol=FID_PROTOCOL, cache_dir=None, key=None):
    """Where the statistics of (dataset, split, protocol, key) are cached.

    Args:
        dataset, split: readable parts of the file name.
        protocol: the feature protocol string.
        cache_dir: root cache folder (default `default_cache_dir()`).
        key: optional JSON-able dict of everything else that changes the
            images (data folder, image size, resize, number of images, ...);
            its sha256 (with the protocol's) names the file.

    Returns:
        The `.npz` path.
    """
    root = os.path.join(cache_dir or default_cache_dir(), _REFERENCE_STATS_FOLDER)
    digest = hashlib.sha256(_canonical_key(protocol, key).encode("utf-8")).hexdigest()[:16]
    return os.path.join(root, f"{_slug(dataset)}__{_slug(split)}__{digest}.npz")


def _arrays_sha256(arrays):
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode("utf-8"))
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_reference_stats(
    dataset,
    split,
    mu,
    sigma,
    num_samples,
    protocol=FID_PROTOCOL,
    cache_dir=None,
    features=None,
    key=None,
):
    """Cache the real-data statistics of (dataset, split, protocol, key).

    The file is written atomically under a temporary name unique to this process
    (`fileio.atomic_write`), so concurrent writers of one key each replace the file
    whole and a reader never sees a mix; a `sha256` entry inside it covers every
    other entry, so a damaged file is detected on load.

    Args:
        dataset, split: e.g. "cifar10", "train".
        mu, sigma: from `feature_statistics`.
        num_samples: how many images they summarise.
        protocol: the feature protocol string (default: this package's).
        cache_dir: root cache folder (default `default_cache_dir()`).
        features: optionally the real features themselves (float32), for KID.
        key: optional dict of the other settings that change the images; see
            `reference_stats_path`.

    Returns:
        The path written.
    """
    path = reference_stats_path(dataset, split, protocol, cache_dir, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = dict(
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        num_samples=np.int64(num_samples),
        dataset=np.str_(dataset),
        split=np.str_(split),
        protocol=np.str_(protocol),
        key=np.str_(_canonical_key(protocol, key)),
    )
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    arrays["sha256"] = np.str_(_arrays_sha256(arrays))
    fileio.atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_reference_stats(dataset, split, protocol=FID_PROTOCOL, cache_dir=None, key=None):
    """Load cached real-data statistics, checking the file's checksum.

    Args:
        dataset, split, protocol, cache_dir, key: as given to `save_reference_stats`.

    Returns:
        dict with `mu`, `sigma`, `num_samples`, `features` (None if not saved),
        `dataset`, `split`, `protocol`, `path`.

    Raises:
        ReferenceStatsNotFoundError: nothing cached for this key; the message
            says how to make it and what else is cached for the dataset.
        CorruptReferenceStatsError: the file is truncated, not an npz, lacks
            or fails its sha256, or was written for another key.
        ValueError: the file's protocol is not the one asked for.
    """
    path = reference_stats_path(dataset, split, protocol, cache_dir, key)
    if not os.path.isfile(path):
        raise _not_found(path, dataset, split, protocol)
    arrays = _read_checked(path)
    stored = str(arrays["protocol"])
    if stored != protocol:
        raise ValueError(
            f"{path} holds statistics for protocol {stored!r}, not {protocol!r}"
        )
    if str(arrays.get("key", "")) != _canonical_key(protocol, key):
        raise CorruptReferenceStatsError(f"{path} was written for another key")
    return dict(
        mu=arrays["mu"],
        sigma=arrays["sigma"],
        num_samples=int(arrays["num_samples"]),
        features=arrays.get("features"),
        dataset=str(arrays["dataset"]),
        split=str(arrays["split"]),
        protocol=stored,
        path=path,
    )


def _not_found(path, dataset, split, protocol) -> ReferenceStatsNotFoundError:
    """The error for a missing entry: how to make it, and what else is cached for the
    dataset (a near miss, e.g. another split, is then plain to see)."""
    folder = os.path.dirname(path)
    prefix = f"{_slug(dataset)}__"
    others = sorted(
        f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
        if f.startswith(prefix) and f.endswith(".npz")
    )
    return ReferenceStatsNotFoundError(
        f"No reference statistics for dataset={dataset!r} split={split!r} "
        f"protocol={protocol!r}: expected {path}. Compute them once with "
        f"features = compute_features(load_fid_network(), real_images); "
        f"mu, sigma = feature_statistics(features); "
        f"save_reference_stats({dataset!r}, {split!r}, mu, sigma, len(features)). "
        f"Cached for this dataset: {others or 'nothing'}."
    )


def _read_checked(path) -> dict:
    """The arrays of an entry whose stored `sha256` matches them (the `sha256` itself
    left out).

    Raises:
        CorruptReferenceStatsError: unreadable, or the checksum is missing or wrong.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        # np.load of a truncated zip raises BadZipFile, EOFError or ValueError
        # depending on where the cut is; all mean the same: rebuild it.
        raise CorruptReferenceStatsError(f"{path} is unreadable: {type(e).__name__}: {e}") \
            from e
    stored_sha = str(arrays.pop("sha256", ""))
    if stored_sha != _arrays_sha256(arrays):
        raise CorruptReferenceStatsError(
            f"{path} fails its checksum (stored {stored_sha[:12] or 'none'}): damaged "
            "or written by an older version")
    return arrays


def cached_reference_stats(dataset, split, build, key=None, protocol=FID_PROTOCOL,
                           cache_dir=None):
    """Cached reference statistics, built with `build()` when missing or unreadable.

    Args:
        dataset, split, key, protocol, cache_dir: see `save_reference_stats`.
        build: a callable returning the real features [N, D]; called only when
            there is no valid cache entry.

    Returns:
        The `load_reference_stats` dict (with `features`), plus `built`: whether
        `build` ran.

    Warns:
        ReferenceStatsRebuiltWarning: when an existing entry was unreadable.
    """
    try:
        cached = load_reference_stats(dataset, split, protocol, cache_dir, key)
        if cached["features"] is not None:
            return {**cached, "built": False}
    except ReferenceStatsNotFoundError:
        pass
    except CorruptReferenceStatsError as e:
        warnings.warn(f"Rebuilding the reference statistics: {e}",
                      ReferenceStatsRebuiltWarning, stacklevel=2)
    features = np.asarray(build(), np.float32)
    mu, sigma = feature_statistics(features)
    path = save_reference_stats(dataset, split, mu, sigma, len(features), protocol,
                                cache_dir, features=features, key=key)
    return dict(mu=mu, sigma=sigma, num_samples=len(features), features=features,
                dataset=str(dataset), split=str(split), protocol=protocol, path=path,
                built=True)
