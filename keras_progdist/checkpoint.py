"""Atomic, verifiable checkpoints of a model and its optimizer.

A checkpoint is `<name>.json` (metadata, variable paths and shapes, the weights file's
name and sha256) plus the weights file it names, `<name>-<sha256[:16]>.npz` (every model
and optimizer variable, RNG state included). The npz gets a new name for new contents,
so writing it never touches the file the current JSON describes; the JSON is then
replaced atomically (temporary file + rename), and only after that are older npz files
of that checkpoint removed. A kill at any moment therefore leaves either the old or the
new checkpoint complete, never a JSON that describes other weights. The format is plain
numpy, identical on every backend.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def _variables(model, include_optimizer: bool = True):
    variables = list(model.variables)
    if include_optimizer and getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return variables


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _weights_files(directory: str, name: str) -> list:
    """Every weights file of checkpoint `name`, current, stale or half-written."""
    return (glob.glob(os.path.join(glob.escape(directory), f"{name}-*.npz"))
            + glob.glob(os.path.join(glob.escape(directory), f"{name}-*.npz.tmp-*"))
            + glob.glob(os.path.join(glob.escape(directory), f"{name}.npz.tmp-*"))
            + glob.glob(os.path.join(glob.escape(directory), f"{name}.npz")))  # old format


def weights_path(directory: str, name: str) -> str:
    """The weights file the checkpoint's JSON names (checked by `read_meta`)."""
    return os.path.join(directory, _verified_record(directory, name)["weights_file"])


def save(directory: str, name: str, model, meta: dict | None = None,
         include_optimizer: bool = True) -> str:
    """Writes `directory/name.{npz,json}` atomically; returns the JSON path."""
    os.makedirs(directory, exist_ok=True)
    variables = _variables(model, include_optimizer)
    arrays = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(variables)}
    tmp = os.path.join(directory, f"{name}.npz.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    weights_file = f"{name}-{digest[:16]}.npz"
    os.replace(tmp, os.path.join(directory, weights_file))
    record = {
        "meta": meta or {},
        "paths": [v.path for v in variables],
        "shapes": [list(v.shape) for v in variables],
        "include_optimizer": include_optimizer,
        "weights_file": weights_file,
        "sha256": digest,
    }
    json_path = os.path.join(directory, f"{name}.json")
    _atomic_write(json_path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    for path in _weights_files(directory, name):  # now unreferenced
        if os.path.basename(path) != weights_file:
            os.remove(path)
    return json_path


def exists(directory: str, name: str) -> bool:
    return os.path.exists(os.path.join(directory, f"{name}.json"))


def recorded_sha256(directory: str, name: str) -> str:
    """The weights' sha256 as the JSON records it (no re-hash: an identity, not a check)."""
    with open(os.path.join(directory, f"{name}.json")) as f:
        return json.load(f)["sha256"]


def read_meta(directory: str, name: str) -> dict:
    """The metadata of a checkpoint, after checking it is complete and uncorrupted."""
    return _verified_record(directory, name)["meta"]


def _verified_record(directory: str, name: str) -> dict:
    json_path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(json_path):
        raise CheckpointError(f"No checkpoint {name!r} in {directory} ({json_path} is missing).")
    try:
        with open(json_path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint metadata {json_path} is corrupt: {e}") from e
    if not isinstance(record, dict) or "sha256" not in record:
        raise CheckpointError(f"Checkpoint metadata {json_path} is not a checkpoint "
                              "record (no sha256).")
    # Checkpoints written before weights files were content-named used `<name>.npz`.
    record.setdefault("weights_file", f"{name}.npz")
    npz_path = os.path.join(directory, record["weights_file"])
    if not os.path.exists(npz_path):
        raise CheckpointError(f"Checkpoint {json_path} has no weights file {npz_path}.")
    digest = _sha256(npz_path)
    if digest != record.get("sha256"):
        raise CheckpointError(
            f"Checkpoint {npz_path} is corrupt: its sha256 is {digest}, the metadata "
            f"recorded {record.get('sha256')}. Delete it to restart that stage.")
    return record


def restore(directory: str, name: str, model) -> dict:
    """Loads `directory/name` into `model` (and its optimizer); returns the metadata.

    Raises:
        CheckpointError: missing or corrupt files, or variables that do not match the
            model (a checkpoint from another network config).
    """
    record = _verified_record(directory, name)
    variables = _variables(model, record["include_optimizer"])
    shapes = [list(v.shape) for v in variables]
    if shapes != record["shapes"]:
        diffs = [(p, s, r) for p, s, r in zip(record["paths"], shapes, record["shapes"])
                 if s != r][:3]
        raise CheckpointError(
            f"Checkpoint {name!r} in {directory} does not match this model: it holds "
            f"{len(record['shapes'])} variables, the model {len(shapes)}; first "
            f"differences (path, model shape, checkpoint shape): {diffs}. The network "
            "config differs from the one that wrote it.")
    with np.load(os.path.join(directory, record["weights_file"])) as arrays:
        for i, variable in enumerate(variables):
            variable.assign(arrays[f"v{i:05d}"])
    return record["meta"]
