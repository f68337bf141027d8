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

import contextlib
import dataclasses
import glob
import json
import os
import re
import zipfile

import numpy as np

from keras_progdist import fileio
from keras_progdist._keras_compat import sync_training_state
from keras_progdist.errors import KerasProgdistError


class CheckpointError(KerasProgdistError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """One named checkpoint, `<directory>/<name>.json` and the weights it names: the
    handle `WorkDir` gives out for a stage's resume point and its finished network.

    Each method is the module function of the same name on this checkpoint."""

    directory: str
    name: str

    def exists(self) -> bool:
        return exists(self.directory, self.name)

    def save(self, model, meta: dict | None = None, include_optimizer: bool = True) -> str:
        return save(self.directory, self.name, model, meta, include_optimizer)

    def restore(self, model) -> dict:
        return restore(self.directory, self.name, model)

    def read_meta(self) -> dict:
        return read_meta(self.directory, self.name)

    def recorded_sha256(self) -> str:
        return recorded_sha256(self.directory, self.name)

    def remove(self) -> None:
        remove(self.directory, self.name)

    def __str__(self) -> str:
        return os.path.join(self.directory, f"{self.name}.json")


def _variables(model, include_optimizer: bool = True):
    variables = list(model.variables)
    if include_optimizer and getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return variables


# A weights file is named by the checkpoint and never by a path: a record naming
# `../x.npz` or `/abs/x.npz` must not load weights from outside the checkpoint folder.
_WEIGHTS_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.npz$")
_REQUIRED_KEYS = ("sha256", "shapes", "paths", "include_optimizer")


def _weights_files(directory: str, name: str) -> list:
    """Finished weights files of checkpoint `name`, current or stale."""
    return (glob.glob(os.path.join(glob.escape(directory), f"{name}-*.npz"))
            + glob.glob(os.path.join(glob.escape(directory), f"{name}.npz")))  # old format


def _remove_unreferenced(directory: str, name: str, keep: str | None) -> None:
    """Removes `name`'s weights files other than `keep`, and its temporaries whose
    writer is dead. A live writer's temporary is never touched (the workdir lock keeps
    two runs apart; this keeps a stray one from breaking the other)."""
    for path in _weights_files(directory, name):
        if os.path.basename(path) != keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    fileio.remove_stale_temps(directory, f"{name}*.npz")


def _canonical_path(path: str) -> str:
    """A variable path without Keras' process-wide uniquifying suffixes
    (`seed_generator_12` -> `seed_generator`), which differ between processes."""
    return re.sub(r"_\d+(?=/|$)", "", path)


def remove(directory: str, name: str) -> None:
    """Deletes checkpoint `name` (its JSON first, so a kill leaves no record of
    missing weights), then its weights files."""
    json_path = os.path.join(directory, f"{name}.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(json_path)
    _remove_unreferenced(directory, name, keep=None)


def weights_path(directory: str, name: str) -> str:
    """The weights file the checkpoint's JSON names (checked by `read_meta`)."""
    return os.path.join(directory, _verified_record(directory, name)["weights_file"])


def save(directory: str, name: str, model, meta: dict | None = None,
         include_optimizer: bool = True) -> str:
    """Writes `directory/name.{npz,json}` atomically; returns the JSON path."""
    os.makedirs(directory, exist_ok=True)
    # Mid-epoch on JAX the variables may hold no values until the trainer syncs them.
    sync_training_state(model)
    variables = _variables(model, include_optimizer)
    arrays = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(variables)}
    # The weights file is named by its hash, known only once it is written.
    with fileio.temporary(os.path.join(directory, f"{name}.npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        digest = fileio.sha256_file(tmp)
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
    fileio.atomic_write_text(json_path, json.dumps(record, indent=1))
    _remove_unreferenced(directory, name, keep=weights_file)
    return json_path


def exists(directory: str, name: str) -> bool:
    return os.path.exists(os.path.join(directory, f"{name}.json"))


def recorded_sha256(directory: str, name: str) -> str:
    """The weights' sha256 as the JSON records it (no re-hash: an identity, not a check)."""
    return _read_record(directory, name)["sha256"]


def read_meta(directory: str, name: str) -> dict:
    """The metadata of a checkpoint, after checking it is complete and uncorrupted."""
    return _verified_record(directory, name)["meta"]


def _recovery(json_path: str, name: str) -> str:
    """The one action that recovers from a damaged checkpoint `name`."""
    what = ("re-train that stage (the stages after it are kept)" if name == "final"
            else "restart that stage from its beginning")
    return (f"Delete {json_path} (the record; its weights file is cleaned up on the next "
            f"run) and re-run the same command to {what}.")


def _read_record(directory: str, name: str) -> dict:
    """The JSON record of checkpoint `name`, with every key checked; no weights read."""
    json_path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(json_path):
        raise CheckpointError(f"No checkpoint {name!r} in {directory} ({json_path} is missing).")
    try:
        with open(json_path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"Checkpoint metadata {json_path} is corrupt: {e}. "
                              f"{_recovery(json_path, name)}") from e
    if not isinstance(record, dict):
        raise CheckpointError(f"Checkpoint metadata {json_path} is not a checkpoint record. "
                              f"{_recovery(json_path, name)}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"Checkpoint metadata {json_path} lacks the key(s) {missing}. "
                              f"{_recovery(json_path, name)}")
    # Checkpoints written before weights files were content-named used `<name>.npz`.
    record.setdefault("weights_file", f"{name}.npz")
    record.setdefault("meta", {})
    weights_file = record["weights_file"]
    if not isinstance(weights_file, str) or not _WEIGHTS_FILE.match(weights_file):
        raise CheckpointError(
            f"Checkpoint metadata {json_path} names the weights file {weights_file!r}; "
            "only a plain .npz file name in the checkpoint's own folder is accepted. "
            f"{_recovery(json_path, name)}")
    problem = _record_type_problem(record)
    if problem:
        raise CheckpointError(f"Checkpoint metadata {json_path} is damaged: {problem}. "
                              f"{_recovery(json_path, name)}")
    if len(record["paths"]) != len(record["shapes"]):
        raise CheckpointError(f"Checkpoint metadata {json_path} records "
                              f"{len(record['paths'])} paths but {len(record['shapes'])} "
                              f"shapes. {_recovery(json_path, name)}")
    return record


# Meta entries that, when present, must be integers >= 0 (what the loaders use them as).
_INT_META = ("step", "num_steps", "updates")


def _record_type_problem(record: dict) -> str | None:
    """What is of the wrong type in a checkpoint record (a JSON that parses but was
    edited or damaged), or None. Every field is checked before any is used, so a
    damaged record is one `CheckpointError`, never a `TypeError` deep in a loader."""

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not (isinstance(record["paths"], list)
            and all(isinstance(p, str) for p in record["paths"])):
        return f"'paths' must be a list of variable paths, got {record['paths']!r:.80}"
    if not (isinstance(record["shapes"], list)
            and all(isinstance(s, list) and all(is_int(d) for d in s)
                    for s in record["shapes"])):
        return f"'shapes' must be a list of shapes, got {record['shapes']!r:.80}"
    if not isinstance(record["sha256"], str):
        return f"'sha256' must be a hex digest, got {record['sha256']!r:.80}"
    if not isinstance(record["include_optimizer"], bool):
        return f"'include_optimizer' must be true or false, got " \
               f"{record['include_optimizer']!r:.80}"
    meta = record["meta"]
    if not isinstance(meta, dict):
        return f"'meta' must be an object, got {meta!r:.80}"
    for key in _INT_META:
        if key in meta and not is_int(meta[key]):
            return f"meta {key!r} must be an integer >= 0, got {meta[key]!r:.80}"
    return None


def _verified_record(directory: str, name: str) -> dict:
    record = _read_record(directory, name)
    json_path = os.path.join(directory, f"{name}.json")
    npz_path = os.path.join(directory, record["weights_file"])
    if not os.path.exists(npz_path):
        raise CheckpointError(f"Checkpoint {json_path} has no weights file {npz_path}. "
                              f"{_recovery(json_path, name)}")
    digest = fileio.sha256_file(npz_path)
    if digest != record.get("sha256"):
        raise CheckpointError(
            f"Checkpoint {npz_path} is corrupt: its sha256 is {digest}, the metadata "
            f"recorded {record.get('sha256')}. {_recovery(json_path, name)}")
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
    paths = [_canonical_path(v.path) for v in variables]
    recorded = [_canonical_path(p) for p in record["paths"]]
    if shapes == record["shapes"] and paths != recorded:
        diffs = [(r, p) for p, r in zip(paths, recorded) if p != r][:3]
        raise CheckpointError(
            f"Checkpoint {name!r} in {directory} holds variables under other names than "
            f"this model's (first differences, checkpoint vs model: {diffs}): it was "
            "written by another network or model.")
    if shapes != record["shapes"]:
        diffs = [(p, s, r) for p, s, r in zip(record["paths"], shapes, record["shapes"])
                 if s != r][:3]
        raise CheckpointError(
            f"Checkpoint {name!r} in {directory} does not match this model: it holds "
            f"{len(record['shapes'])} variables, the model {len(shapes)}; first "
            f"differences (path, model shape, checkpoint shape): {diffs}. The network "
            "config differs from the one that wrote it.")
    npz_path = os.path.join(directory, record["weights_file"])
    values = _read_arrays(npz_path, shapes, _recovery(os.path.join(
        directory, f"{name}.json"), name))
    for variable, value in zip(variables, values):
        variable.assign(value)
    return record["meta"]


def _read_arrays(npz_path: str, shapes: list, recovery: str) -> list:
    """The arrays `v00000...` of `npz_path`, each checked against its expected shape
    before any variable is touched (a file rewritten with a matching sha256 in its
    record still has to hold what the record says).

    Raises:
        CheckpointError: not an npz, an array missing, of another shape, or not numeric.
    """
    try:
        with np.load(npz_path, allow_pickle=False) as arrays:
            values = []
            for i, shape in enumerate(shapes):
                key = f"v{i:05d}"
                if key not in arrays.files:
                    raise CheckpointError(f"Checkpoint {npz_path} lacks the array {key}. "
                                          f"{recovery}")
                value = arrays[key]
                if list(value.shape) != list(shape) or value.dtype.kind not in "biuf":
                    raise CheckpointError(
                        f"Checkpoint {npz_path}: array {key} is {value.dtype} "
                        f"{list(value.shape)}, the record says a number array of shape "
                        f"{list(shape)}. {recovery}")
                values.append(value)
            return values
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"Checkpoint {npz_path} cannot be read as an npz file "
                              f"({e}). {recovery}") from None
