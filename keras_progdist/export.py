"""Per-stage exports for serving: TF Serving SavedModels and `.keras` files.

For the teacher and every finished distillation stage of a run, `export_experiment` /
`export_workdir` write

    <export_dir>/<name>/models.config                    TF Serving model config, all stages
    <export_dir>/<name>/<name>-<N>steps/<version>/       SavedModel (TF Serving layout)
        saved_model.pb, variables/, fingerprint.pb
        assets.extra/tf_serving_warmup_requests          PredictionLogs for serving_default
        assets.extra/export_metadata.json                weights sha256, limits, settings
    <export_dir>/<name>/<name>-<N>steps.keras            DiffusionModel(ema_decay=None,
                                                         num_steps=N) for keras.saving
    <export_dir>/<name>/<name>-<N>steps.keras.json       the same metadata for the .keras

Each SavedModel holds the whole DDIM loop in its graph (`samplers.ddim_sample`, the same
function `DiffusionModel.sample` runs), so one model serves any step count up to a limit:

    serving_default  seed int32 [B] (+ label int32 [B]) -> images uint8 [B, H, W, C]
                     DDIM in the stage's own N steps from `noise_from_seeds(seed)`, clipped
    generate         noise float32 [B, H, W, C], steps int32 [] (+ label)
                     -> images float32 [B, H, W, C] in [-1, 1] (DDIM, clipped)
    denoise          z float32 [B, H, W, C], t float32 [B] (+ label)
                     -> x_hat, eps_hat float32 [B, H, W, C]

Inputs are checked inside the graph, each message naming the input: shapes with
`tf.ensure_shape` (a loaded signature, like TF Serving, runs whatever shape it is fed),
values with `tf.debugging` asserts (negative seed, label outside `[0, num_classes)`,
`steps <= 0`, `t` outside [0, 1]), and the serving limits fixed at export: `1 <= B <=
max_batch` in every signature and `steps <= max_steps` in `generate` (one request can
not make the server loop for hours or allocate without bound). A bad request fails with
`InvalidArgumentError` and the model keeps serving.

Versions follow TF Serving's convention: the highest numeric folder is served, and a
number is never reused for other weights. Exporting weights that the current version
already holds (same weights sha256, same settings) writes nothing; other weights get the
next number; `overwrite=True` replaces the current version. A version folder is built
under a dot-name and claimed with a rename that fails if the folder exists, so two
exporters racing for one number never both get it.

Export only reads the work directory. SavedModels are written with the TensorFlow
backend. Checkpoints are backend-neutral npz files, so a run trained on JAX is exported
by a TensorFlow subprocess that imports this very package
(`python -m keras_progdist.export --workdir ... --export_dir ...`).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import keras
import numpy as np

from keras_progdist import checkpoint, fileio, samplers
from keras_progdist.diffusion import DiffusionModel, network_denoise
from keras_progdist.networks.unet import UNet
from keras_progdist.schedules import get_schedule

# None: automatic versioning (the current version if it holds these weights, else the next).
DEFAULT_VERSION = None
DEFAULT_MAX_BATCH = 256
# The default max_steps of a stage is max(DEFAULT_MAX_STEPS, 4 * its own step count).
DEFAULT_MAX_STEPS = 1024
_INT32_MAX = 2 ** 31 - 1
MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
METADATA_FILE = os.path.join("assets.extra", "export_metadata.json")
KERAS_METADATA_SUFFIX = ".json"
# Bump when the serving graph changes in a way an existing export should not hide:
# an export with another format is never "up to date".
EXPORT_FORMAT = 2
# The metadata fields that make two exports the same; the rest (version, dates,
# library versions) describe the writing, not the model served.
_IDENTITY_KEYS = ("format", "num_steps", "weights_sha256", "limits", "image_shape",
                  "num_classes", "parameterization", "schedule")
SERVING_ROOT = "/models"
SERVING_API_INSTALL = "pip install --no-deps tensorflow-serving-api==2.21.0"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Temporaries: `.version.tmp-<pid>-<hex>/` (a version being built), `.replaced-<v>.tmp-
# <pid>-<hex>/` (the version an overwrite moved aside), and the names older releases
# used, `.tmp-<v>-<pid>/` and `.old-<v>-<pid>/`.
_BUILD_PREFIX = ".version"
_REPLACED = re.compile(r"^\.replaced-(\d+)" + re.escape(fileio.TMP_MARK))
_LEGACY_TEMP = re.compile(r"^\.(tmp|old)-(\d+)-(\d+)$")


class ExportError(ValueError):
    """A work directory or export target that cannot be exported (to)."""


class ExportExistsError(FileExistsError):
    """The export folder holds that version with other weights; pass `overwrite=True`
    to replace it, or leave `version` unset to get the next number."""


# -- naming ------------------------------------------------------------------------------
def model_name(name: str, num_steps: int) -> str:
    """TF Serving model name of a stage: `<name>-<N>steps`."""
    return f"{name}-{num_steps}steps"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ExportError(f"Export name {name!r} must be letters, digits, '_', '.' or '-' "
                          "(it becomes a folder, a TF Serving model name and a URL part).")
    return name


def _check_version(version) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving's numeric "
                          f"version folder) or None (the next one), got {version!r}.")
    return int(version)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= _INT32_MAX:
        raise ExportError(f"{name} must be an integer in [1, {_INT32_MAX}] (an int32 "
                          f"limit of the serving graph), got {value!r}.")
    return int(value)


def serving_limits(num_steps: int, max_steps: int | None = None,
                   max_batch: int | None = None, warmup_batch_sizes=(1,)) -> dict:
    """The request limits a stage is exported with: `{"max_steps", "max_batch"}`.

    Args:
        num_steps: the stage's own step count (what `serving_default` runs).
        max_steps: the most DDIM steps `generate` accepts; default
            `max(DEFAULT_MAX_STEPS, 4 * num_steps)`.
        max_batch: the most images one request of any signature may ask for; default
            `DEFAULT_MAX_BATCH`.
        warmup_batch_sizes: the warm-up request sizes, which must be allowed.

    Returns:
        `{"max_steps": int, "max_batch": int}`.

    Raises:
        ExportError: a limit that is not a positive int32, `max_steps < num_steps`
            (`serving_default` could never run), or a warm-up batch above `max_batch`.
    """
    num_steps = int(num_steps)
    max_steps = (max(DEFAULT_MAX_STEPS, 4 * num_steps) if max_steps is None
                 else _positive_int("max_steps", max_steps))
    max_batch = (DEFAULT_MAX_BATCH if max_batch is None
                 else _positive_int("max_batch", max_batch))
    if max_steps < num_steps:
        raise ExportError(f"max_steps={max_steps} is below the stage's own {num_steps} "
                          "steps, so its serving_default could never run.")
    too_big = [b for b in warmup_batch_sizes if not 1 <= int(b) <= max_batch]
    if too_big:
        raise ExportError(f"Warm-up batch sizes {too_big} are outside [1, max_batch="
                          f"{max_batch}]: the server would refuse its own warm-up.")
    return {"max_steps": max_steps, "max_batch": max_batch}


# -- the serving graph -------------------------------------------------------------------
def noise_from_seeds(seeds, image_shape):
    """`z_1` for each seed: `tf.random.stateless_normal(image_shape, seed=[s, 0])`.

    Noise is drawn per seed, so an image depends only on its own seed, whatever else
    shares the batch (TF Serving's request batching stays invisible).
    """
    import tensorflow as tf

    seeds = tf.convert_to_tensor(seeds, tf.int32)
    return tf.map_fn(
        lambda s: tf.random.stateless_normal(tuple(image_shape), seed=tf.stack([s, 0])),
        seeds, fn_output_signature=tf.float32)


def to_uint8(images):
    """[-1, 1] floats -> uint8 `round((x + 1) * 127.5)` (as `images.to_uint8`)."""
    import tensorflow as tf

    return tf.cast(tf.clip_by_value(tf.round((images + 1.0) * 127.5), 0.0, 255.0),
                   tf.uint8)


def _label_checks(label, batch, num_classes, batch_input):
    import tensorflow as tf

    return [
        tf.debugging.assert_equal(
            tf.shape(label)[0], batch,
            message=f"label must hold one class per {batch_input} (same batch size)"),
        tf.debugging.assert_non_negative(
            label, message=f"label must be in [0, {num_classes})"),
        tf.debugging.assert_less(
            label, tf.constant(num_classes, tf.int32),
            message=f"label must be in [0, {num_classes})"),
    ]


def _batch_checks(x, input_name, max_batch):
    """Asserts `1 <= len(x) <= max_batch`, naming the input and the limit.

    An empty batch would otherwise die deep in the sampler with `Incompatible shapes`,
    and an unbounded one lets a single request take all the server's memory.
    """
    import tensorflow as tf

    size = tf.shape(x)[0]
    return [
        tf.debugging.assert_positive(
            size, message=f"{input_name} is empty: send at least one (batch size 0)"),
        tf.debugging.assert_less_equal(
            size, tf.constant(max_batch, tf.int32),
            message=f"{input_name} holds more than max_batch={max_batch} entries (the "
                    "limit set at export): split the request"),
    ]


def _with_checks(checks, *tensors):
    import tensorflow as tf

    with tf.control_dependencies(checks):
        return tuple(None if x is None else tf.identity(x) for x in tensors)


def build_archive(model: DiffusionModel, num_steps: int | None = None,
                  max_steps: int | None = None, max_batch: int | None = None):
    """A `keras.export.ExportArchive` with the three signatures of `model`.

    Args:
        model: a `DiffusionModel` (its sampling network is exported).
        num_steps: the step count of `serving_default` (default: `model.num_steps`).
        max_steps: the most `steps` `generate` accepts (see `serving_limits`).
        max_batch: the most images per request in every signature (see `serving_limits`).

    Returns:
        The archive; `archive.write_out(path)` writes the SavedModel.
    """
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise ExportError("SavedModel export needs the TensorFlow backend; use "
                          "export_workdir, which runs a TensorFlow subprocess.")
    num_steps = int(num_steps or model.num_steps)
    limits = serving_limits(num_steps, max_steps, max_batch)
    max_steps, max_batch = limits["max_steps"], limits["max_batch"]
    network = model.sampling_network
    schedule, parameterization = model.schedule, model.parameterization
    height, width, channels = model.image_shape
    image_shape = (height, width, channels)
    num_classes = model.num_classes

    def ddim(noise, steps, label):
        def denoise_fn(z, t):
            return network_denoise(network, z, t, schedule, parameterization, label)
        return samplers.ddim_sample(denoise_fn, noise, steps, schedule, clip=True)

    image_spec = [None, height, width, channels]

    def shaped(x, shape):
        # Loaded signatures do not enforce their declared shapes (nor does TF Serving),
        # and constant folding drops rank asserts, so check at run time: "Shape of
        # tensor <input> [...] is not compatible with expected shape [...]".
        return None if x is None else tf.ensure_shape(x, shape)

    def serve(seed, label=None):
        seed, label = shaped(seed, [None]), shaped(label, [None])
        checks = _batch_checks(seed, "seed", max_batch)
        checks.append(tf.debugging.assert_non_negative(seed, message="seed must be >= 0"))
        if label is not None:
            checks += _label_checks(label, tf.shape(seed)[0], num_classes, "seed")
        seed, label = _with_checks(checks, seed, label)
        noise = noise_from_seeds(seed, image_shape)
        return {"images": to_uint8(ddim(noise, num_steps, label))}

    def generate(noise, steps, label=None):
        noise, steps = shaped(noise, image_spec), shaped(steps, [])
        label = shaped(label, [None])
        checks = _batch_checks(noise, "noise", max_batch) + [
            tf.debugging.assert_positive(steps, message="steps must be >= 1"),
            # The loop runs `steps` network evaluations: refuse before the first one.
            tf.debugging.assert_less_equal(
                steps, tf.constant(max_steps, tf.int32),
                message=f"steps must be <= max_steps={max_steps} (the limit set at "
                        "export)")]
        if label is not None:
            checks += _label_checks(label, tf.shape(noise)[0], num_classes, "noise image")
        noise, steps, label = _with_checks(checks, noise, steps, label)
        return {"images": ddim(noise, steps, label)}

    def denoise(z, t, label=None):
        z, t, label = shaped(z, image_spec), shaped(t, [None]), shaped(label, [None])
        checks = _batch_checks(z, "z", max_batch) + [
            tf.debugging.assert_equal(tf.shape(t)[0], tf.shape(z)[0],
                                      message="t must hold one time per z"),
            tf.debugging.assert_greater_equal(t, 0.0, message="t must be in [0, 1]"),
            tf.debugging.assert_less_equal(t, 1.0, message="t must be in [0, 1]")]
        if label is not None:
            checks += _label_checks(label, tf.shape(z)[0], num_classes, "z")
        z, t, label = _with_checks(checks, z, t, label)
        x_hat, eps_hat = network_denoise(network, z, t, schedule, parameterization, label)
        return {"x_hat": x_hat, "eps_hat": eps_hat}

    label_spec = [tf.TensorSpec([None], tf.int32, name="label")] if num_classes else []
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint(
        "serving_default", serve,
        [tf.TensorSpec([None], tf.int32, name="seed")] + label_spec)
    archive.add_endpoint(
        "generate", generate,
        [tf.TensorSpec(image_spec, tf.float32, name="noise"),
         tf.TensorSpec([], tf.int32, name="steps")] + label_spec)
    archive.add_endpoint(
        "denoise", denoise,
        [tf.TensorSpec(image_spec, tf.float32, name="z"),
         tf.TensorSpec([None], tf.float32, name="t")] + label_spec)
    return archive


# -- TF Serving files --------------------------------------------------------------------
def _serving_apis():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError as e:
        raise ImportError(
            "Writing TF Serving warm-up requests and models.config needs the protos of "
            f"tensorflow-serving-api ({e}). It declares a dependency on full `tensorflow`, "
            f"so install it without deps next to tensorflow-cpu: `{SERVING_API_INSTALL}`."
        ) from e
    return predict_pb2, prediction_log_pb2, model_server_config_pb2


def write_warmup_requests(saved_model_dir: str, serving_name: str, num_classes=None,
                          batch_sizes=(1,)) -> str:
    """Writes `assets.extra/tf_serving_warmup_requests` (TFRecord of `PredictionLog`s).

    One `serving_default` request per batch size, seeds `0..B-1` (labels `i % classes`).
    TF Serving replays them when it loads the version, before the first real request.

    Args:
        saved_model_dir: the (temporary) version folder.
        serving_name: the TF Serving model name the requests address.
        num_classes: the class count of a class-conditional model, else None.
        batch_sizes: one request per size.

    Returns:
        The file's path.
    """
    import tensorflow as tf

    predict_pb2, prediction_log_pb2, _ = _serving_apis()
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = serving_name
            request.model_spec.signature_name = "serving_default"
            request.inputs["seed"].CopyFrom(
                tf.make_tensor_proto(np.arange(batch, dtype=np.int32)))
            if num_classes:
                request.inputs["label"].CopyFrom(tf.make_tensor_proto(
                    np.arange(batch, dtype=np.int32) % num_classes))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def write_models_config(root: str, name: str, serving_root: str = SERVING_ROOT) -> str:
    """`<root>/models.config` listing every `<name>-<N>steps` model found under `root`.

    `base_path` is where the server sees each model: `<serving_root>/<name>/<model>`
    (the export dir mounted at `/models` in the `tensorflow/serving` container). The
    file is rewritten only when its text changes, so an up-to-date export touches
    nothing a server watches.

    Returns:
        The file's path.
    """
    from google.protobuf import text_format

    _, _, model_server_config_pb2 = _serving_apis()
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)steps$")
    found = sorted((int(m.group(1)), entry) for entry in os.listdir(root)
                   if (m := pattern.match(entry)) and os.path.isdir(os.path.join(root, entry)))
    config = model_server_config_pb2.ModelServerConfig()
    for _, entry in sorted(found, reverse=True):
        model = config.model_config_list.config.add()
        model.name = entry
        model.base_path = f"{serving_root.rstrip('/')}/{name}/{entry}"
        model.model_platform = "tensorflow"
    path = os.path.join(root, MODELS_CONFIG)
    text = text_format.MessageToString(config)
    if _read_text(path) != text:
        fileio.atomic_write_text(path, text)
    return path


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


# -- identity of an export ---------------------------------------------------------------
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


def stage_metadata(model: DiffusionModel, name: str, num_steps: int, limits: dict) -> dict:
    """What an export of `model` records about itself (`assets.extra/export_metadata.json`
    in the version folder and `<model>.keras.json` next to the `.keras` file).

    Args:
        model: the stage's `DiffusionModel`.
        name: the export name; num_steps: the stage's step count.
        limits: `serving_limits(...)`.

    Returns:
        A JSON-ready dict; the `_IDENTITY_KEYS` fields decide whether two exports are
        the same.
    """
    import tensorflow as tf

    return json.loads(json.dumps({
        "format": EXPORT_FORMAT,
        "name": name,
        "model_name": model_name(name, num_steps),
        "num_steps": int(num_steps),
        "weights_sha256": weights_sha256(model.sampling_network),
        "limits": limits,
        "image_shape": list(model.image_shape),
        "num_classes": int(model.num_classes or 0),
        "parameterization": model.parameterization,
        "schedule": model.schedule.get_config(),
        "signatures": {
            "serving_default": "seed int32 [B] (+ label) -> images uint8 [B, H, W, C]",
            "generate": "noise float32 [B, H, W, C], steps int32 [] (+ label) -> images",
            "denoise": "z float32 [B, H, W, C], t float32 [B] (+ label) -> x_hat, eps_hat"},
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }))


def same_export(recorded: dict | None, metadata: dict) -> bool:
    """Whether `recorded` (an existing export's metadata) serves what `metadata` would."""
    return isinstance(recorded, dict) and all(
        recorded.get(key) == metadata.get(key) for key in _IDENTITY_KEYS)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        # A version from before metadata existed (or a damaged file) is "unknown
        # weights": never up to date, never overwritten without overwrite=True.
        return None


def read_version_metadata(version_dir: str) -> dict | None:
    """The `export_metadata.json` of a version folder, or None (none, or unreadable)."""
    return _read_json(os.path.join(version_dir, METADATA_FILE))


def existing_versions(base_path: str) -> list:
    """The numeric version folders under a model's base path, ascending."""
    try:
        entries = os.listdir(base_path)
    except FileNotFoundError:
        return []
    return sorted(int(e) for e in entries
                  if e.isdigit() and os.path.isdir(os.path.join(base_path, e)))


# -- stale temporaries -------------------------------------------------------------------
def remove_stale_temps(base_path: str) -> list:
    """Cleans what killed exports left in a model's base path; returns what it removed.

    A temporary whose writer (the pid in its name) is dead is removed; one of a live
    process is another export in progress and stays. A version folder that an
    overwrite moved aside (`.replaced-<v>...`, legacy `.old-<v>-<pid>`) is moved back
    when the kill left no version `<v>`, so a kill mid-overwrite never loses a version.
    """
    removed = []
    try:
        entries = os.listdir(base_path)
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = os.path.join(base_path, entry)
        legacy = _LEGACY_TEMP.match(entry)
        if legacy:
            kind, version, pid = legacy.group(1), legacy.group(2), int(legacy.group(3))
        elif (replaced := _REPLACED.match(entry)):
            kind, version, pid = "old", replaced.group(1), fileio.temp_owner(entry)
        else:
            continue
        if pid is None or pid == os.getpid() or fileio.pid_alive(pid):
            continue
        target = os.path.join(base_path, str(int(version)))
        if kind == "old" and not os.path.exists(target):
            os.rename(path, target)
            print(f"[export] restored {target} from {path} (an overwrite was killed)",
                  flush=True)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    # `.version.tmp-<pid>-<hex>/` builds; the glob needs the leading dot to see them.
    return removed + fileio.remove_stale_temps(base_path, ".*")


def _remove_stale_root_temps(root: str) -> list:
    # `<model>.keras.tmp-<pid>...`, `<model>.keras.json.tmp-...`, `models.config.tmp-...`
    removed = fileio.remove_stale_temps(root)
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, entry)
        if os.path.isdir(path) and not entry.startswith("."):
            removed += remove_stale_temps(path)
    return removed


# -- claiming a version ------------------------------------------------------------------
def _rename_noreplace(src: str, dst: str) -> None:
    """Renames the folder `src` to `dst`; FileExistsError if `dst` exists.

    rename(2) refuses to replace a non-empty folder, and every version folder appears
    complete (non-empty) in one rename, so of two exporters renaming onto one version
    exactly one wins, atomically; the pre-check only covers an empty folder someone
    made by hand.
    """
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "version folder exists", dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "version folder exists", dst) from e
        raise


def _replace_version(tmp: str, target: str, version: int) -> None:
    """Puts `tmp` at `target`, moving the old version aside under a temp name first.

    A kill between the two renames leaves `.replaced-<v>.tmp-<pid>-...`, which the next
    export moves back (`remove_stale_temps`).
    """
    aside = fileio.temp_name(os.path.join(os.path.dirname(target), f".replaced-{version}"))
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        aside = None
    try:
        _rename_noreplace(tmp, target)
    except BaseException:
        if aside is not None and not os.path.exists(target):
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _plan_version(base_path: str, metadata: dict, version: int | None,
                  overwrite: bool) -> dict:
    """Which version a stage goes to, decided before anything is written.

    Returns:
        `{"version": v, "action": "up to date" | "new" | "replace"}`.

    Raises:
        ExportExistsError: `version` is given, exists, holds other weights (or unknown
            ones), and `overwrite` is False.
    """
    versions = existing_versions(base_path)
    if version is None:
        if not versions:
            return {"version": 1, "action": "new"}
        current = versions[-1]  # the one TF Serving serves
        if overwrite:
            return {"version": current, "action": "replace"}
        if same_export(read_version_metadata(os.path.join(base_path, str(current))),
                       metadata):
            return {"version": current, "action": "up to date"}
        return {"version": current + 1, "action": "new"}
    if version not in versions:
        return {"version": version, "action": "new"}
    if overwrite:
        return {"version": version, "action": "replace"}
    target = os.path.join(base_path, str(version))
    if same_export(read_version_metadata(target), metadata):
        return {"version": version, "action": "up to date"}
    raise ExportExistsError(
        f"{target} already holds version {version} of {metadata['model_name']} with other "
        "weights (or settings); pass overwrite=True (--overwrite) to replace it, or leave "
        "the version unset to export the next one.")


def _write_version(model, paths, num_steps, limits, metadata, plan, explicit,
                   warmup_batch_sizes) -> tuple:
    """Builds the SavedModel under a dot-name and claims its version folder.

    A dot-name is not a numeric version, so TF Serving ignores it while it is written.
    When another exporter claimed the planned number first, its metadata decides:
    the same weights make this export up to date; other weights move this one to the
    next free number, or (an explicit `version`) raise ExportExistsError.

    Returns:
        `(version, status)`, status `"exported"`, `"replaced"` or `"up to date"`.
    """
    base = paths["base_path"]
    os.makedirs(base, exist_ok=True)
    tmp = fileio.temp_name(os.path.join(base, _BUILD_PREFIX))
    version = plan["version"]
    try:
        build_archive(model, num_steps, **limits).write_out(tmp, verbose=False)
        write_warmup_requests(tmp, paths["model_name"], model.num_classes,
                              warmup_batch_sizes)
        while True:
            fileio.atomic_write_json(os.path.join(tmp, METADATA_FILE),
                                     {**metadata, "version": version})
            target = os.path.join(base, str(version))
            if plan["action"] == "replace":
                _replace_version(tmp, target, version)
                return version, "replaced"
            try:
                _rename_noreplace(tmp, target)
                return version, "exported"
            except FileExistsError:
                other = read_version_metadata(target)
                if same_export(other, metadata):
                    return version, "up to date"
                if explicit:
                    raise ExportExistsError(
                        f"{target}: another export claimed version {version} of "
                        f"{paths['model_name']} with other weights meanwhile; pass "
                        "overwrite=True or leave the version unset.") from None
                print(f"[export] {paths['model_name']}: version {version} was claimed by "
                      "another export meanwhile; taking the next one", flush=True)
                version = max(existing_versions(base) + [version]) + 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_keras(model, num_steps, paths, metadata, version, overwrite) -> str:
    """Writes the `.keras` file and its `.keras.json` unless they already hold `metadata`.

    The `.keras` file follows the highest version: an explicit export of an older
    version leaves a newer one's file alone.

    Returns:
        `"exported"`, `"up to date"` or `"kept"` (a newer version's file).
    """
    path, sidecar = paths["keras"], paths["keras"] + KERAS_METADATA_SUFFIX
    recorded = _read_json(sidecar)
    if isinstance(recorded, dict) and int(recorded.get("version") or 0) > version \
            and os.path.exists(path):
        return "kept"
    # The file hash catches a .keras replaced behind the sidecar's back (or a kill
    # between writing the two).
    if not overwrite and same_export(recorded, metadata) and os.path.exists(path) \
            and recorded.get("file_sha256") == fileio.sha256_file(path):
        return "up to date"
    sampler = sampling_copy(model, num_steps)
    tmp = fileio.temp_name(path) + ".keras"  # Keras insists on the extension
    try:
        with warnings.catch_warnings():
            # DiffusionModel.call is never run, so Keras calls it unbuilt; its network is
            # built and every weight is saved.
            warnings.filterwarnings("ignore", message=".*has not yet been built.*")
            sampler.save(tmp)
        file_sha256 = fileio.sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fileio.atomic_write_json(sidecar, {**metadata, "version": version,
                                       "file": os.path.basename(path),
                                       "file_sha256": file_sha256})
    return "exported"


# -- one stage ---------------------------------------------------------------------------
def stage_paths(export_dir: str, name: str, num_steps: int,
                version: int | None = DEFAULT_VERSION) -> dict:
    """Where a stage's files go.

    Args:
        export_dir, name, num_steps: the export root, name and the stage's step count.
        version: the version folder; None: the highest existing one (1 if none).

    Returns:
        `{"root", "model_name", "base_path", "saved_model" (the version folder),
        "version", "keras", "keras_metadata"}`.
    """
    root = os.path.join(export_dir, name)
    serving_name = model_name(name, num_steps)
    base = os.path.join(root, serving_name)
    if version is None:
        version = (existing_versions(base) or [1])[-1]
    keras_path = os.path.join(root, f"{serving_name}.keras")
    return {"root": root, "model_name": serving_name, "base_path": base,
            "saved_model": os.path.join(base, str(version)), "version": int(version),
            "keras": keras_path, "keras_metadata": keras_path + KERAS_METADATA_SUFFIX}


def _prepare_stage(model, name, num_steps, version, overwrite, export_dir, max_steps,
                   max_batch, warmup_batch_sizes) -> dict:
    num_steps = int(num_steps or model.num_steps)
    paths = stage_paths(export_dir, name, num_steps, 1)
    limits = serving_limits(num_steps, max_steps, max_batch, warmup_batch_sizes)
    metadata = stage_metadata(model, name, num_steps, limits)
    plan = _plan_version(paths["base_path"], metadata, version, overwrite)
    return {"model": model, "num_steps": num_steps, "paths": paths, "limits": limits,
            "metadata": metadata, "plan": plan}


def _run_stage(prepared, version, overwrite, warmup_batch_sizes) -> dict:
    model, num_steps = prepared["model"], prepared["num_steps"]
    paths, metadata, plan = prepared["paths"], prepared["metadata"], prepared["plan"]
    if plan["action"] == "up to date":
        saved_version, status = plan["version"], "up to date"
    else:
        saved_version, status = _write_version(
            model, paths, num_steps, prepared["limits"], metadata, plan,
            version is not None, warmup_batch_sizes)
    keras_status = _write_keras(model, num_steps, paths, metadata, saved_version, overwrite)
    target = os.path.join(paths["base_path"], str(saved_version))
    return {"num_steps": num_steps, "model_name": paths["model_name"],
            "version": saved_version, "status": status, "keras_status": keras_status,
            "saved_model": target, "keras": paths["keras"],
            "weights_sha256": metadata["weights_sha256"], "limits": prepared["limits"]}


def export_stage(model: DiffusionModel, export_dir: str, name: str,
                 num_steps: int | None = None, version: int | None = DEFAULT_VERSION,
                 overwrite: bool = False, warmup_batch_sizes=(1,),
                 max_steps: int | None = None, max_batch: int | None = None) -> dict:
    """Exports one stage: SavedModel version folder (+ warm-up, metadata) and `.keras`.

    The `.keras` file holds `DiffusionModel(ema_decay=None, num_steps=N)` around the
    stage's sampling network. Both are written under temporary names and renamed into
    place, so TF Serving never sees a half-written version. Stale temporaries of killed
    exports are removed first.

    Args:
        model: the stage's `DiffusionModel`.
        export_dir: the export root; name: the export name.
        num_steps: the stage's step count (default `model.num_steps`).
        version: None (default): the current version if it holds these weights (nothing
            is written), else the next number. An int: that version folder.
        overwrite: replace the current (or given) version even if it holds these or
            other weights.
        warmup_batch_sizes: one warm-up request per size.
        max_steps, max_batch: the serving limits (see `serving_limits`).

    Returns:
        `{"num_steps", "model_name", "version", "status" ("exported", "replaced" or
        "up to date"), "keras_status", "saved_model", "keras", "weights_sha256",
        "limits"}`.

    Raises:
        ExportExistsError: `version` exists with other weights and `overwrite` is False.
        ExportError: a bad name, version or limit.
    """
    name = _check_name(name)
    version = _check_version(version)
    _serving_apis()
    root = os.path.join(export_dir, name)
    _remove_stale_root_temps(root)
    prepared = _prepare_stage(model, name, num_steps, version, overwrite, export_dir,
                              max_steps, max_batch, warmup_batch_sizes)
    return _run_stage(prepared, version, overwrite, warmup_batch_sizes)


def sampling_copy(model: DiffusionModel, num_steps: int) -> DiffusionModel:
    """`model`'s sampling network as an EMA-free `DiffusionModel` with `num_steps`."""
    if model.ema_network is None and model.num_steps == num_steps:
        return model
    network = UNet.from_config(model.sampling_network.get_config())
    network.set_weights([w.copy() for w in model.sampling_network.get_weights()])
    return DiffusionModel(network, schedule=model.schedule,
                          parameterization=model.parameterization,
                          weighting=model.weighting, ema_decay=None,
                          num_steps=num_steps, name=f"sampler_{num_steps}")


def export_stages(stages, export_dir: str, name: str, overwrite: bool = False,
                  version: int | None = DEFAULT_VERSION, serving_root: str = SERVING_ROOT,
                  max_steps: int | None = None, max_batch: int | None = None,
                  warmup_batch_sizes=(1,)) -> dict:
    """Exports `[(stage, num_steps, DiffusionModel)]` and writes `models.config`.

    Every stage's version is planned before anything is written, so a refused export
    (ExportExistsError) leaves the export folder as it was. Stages already exported
    with the same weights are reported up to date and not touched.

    Args:
        stages: `[(stage name, num_steps, DiffusionModel)]`.
        export_dir, name, overwrite, version, max_steps, max_batch, warmup_batch_sizes:
            as `export_stage` (the limits apply to every stage; the default max_steps
            is per stage).
        serving_root: where the server sees `export_dir` (models.config `base_path`).

    Returns:
        `{"name", "version" (as asked: None for automatic), "root", "models_config",
        "up_to_date" (bool: nothing was written), "stages": [export_stage records +
        "stage"]}`.
    """
    name = _check_name(name)
    version = _check_version(version)
    _serving_apis()  # fail before the slow part when the protos are missing
    if not stages:
        raise ExportError("Nothing to export: no finished stage.")
    root = os.path.join(export_dir, name)
    for path in _remove_stale_root_temps(root):
        print(f"[export] removed {path} (left by a killed export)", flush=True)
    prepared = [(stage, _prepare_stage(model, name, n, version, overwrite, export_dir,
                                       max_steps, max_batch, warmup_batch_sizes))
                for stage, n, model in stages]
    exported = []
    for stage, item in prepared:
        record = _run_stage(item, version, overwrite, warmup_batch_sizes)
        exported.append({"stage": stage, **record})
        if record["status"] == "up to date" and record["keras_status"] != "exported":
            print(f"[export] {stage}: {record['model_name']} version {record['version']} "
                  f"is up to date (weights sha256 {record['weights_sha256'][:12]}): "
                  "nothing written", flush=True)
        else:
            print(f"[export] {stage}: {record['status']} {record['saved_model']}, .keras "
                  f"{record['keras_status']} ({record['keras']})", flush=True)
    config = write_models_config(root, name, serving_root)
    up_to_date = all(r["status"] == "up to date" and r["keras_status"] != "exported"
                     for r in exported)
    return {"name": name, "version": version, "root": root, "models_config": config,
            "up_to_date": up_to_date, "stages": exported}


# -- from a run --------------------------------------------------------------------------
def _check_workdir(workdir: str) -> None:
    # A typo'd workdir must not be created (nor exported as "nothing"): export only reads.
    if not os.path.isdir(workdir):
        raise ExportError(f"Work directory {workdir} does not exist (or is not a folder); "
                          "export reads a finished run and never creates one.")


def load_workdir_stages(workdir: str) -> list:
    """`[(stage, num_steps, DiffusionModel)]` of a work directory, without gin.

    Rebuilds the network from `config.json` and loads each finished stage's
    `final` checkpoint (teacher, then students from most to fewest steps). Only reads
    the work directory.

    Raises:
        ExportError: a missing work directory, or one without a finished teacher.
    """
    _check_workdir(workdir)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ExportError(f"{workdir} is not a keras-progdist work directory "
                          f"({config_path} is missing).")
    with open(config_path) as f:
        config = json.load(f)
    stages_path = os.path.join(workdir, "stages.json")
    recorded = {}
    if os.path.exists(stages_path):
        with open(stages_path) as f:
            recorded = {s["stage"]: int(s["num_steps"]) for s in json.load(f)}
    students = sorted(((int(m.group(1)), entry) for entry in os.listdir(workdir)
                       if (m := re.match(r"^student_(\d+)$", entry))
                       and checkpoint.exists(os.path.join(workdir, entry), "final")),
                      reverse=True)
    if not checkpoint.exists(os.path.join(workdir, "teacher"), "final"):
        raise ExportError(f"No finished teacher in {workdir} (teacher/final.json is "
                          "missing): train it first.")
    if "teacher" in recorded:
        teacher_steps = recorded["teacher"]
    elif students:
        teacher_steps = 2 * students[0][0]
    else:
        raise ExportError(f"{stages_path} does not record the teacher's step count.")
    diffusion = config["diffusion"]
    stages = []
    for stage, n in [("teacher", teacher_steps)] + [(s, n) for n, s in students]:
        network = UNet.from_config({**config["network"], "name": "network"})
        checkpoint.restore(os.path.join(workdir, stage), "final", network)
        model = DiffusionModel(network, schedule=get_schedule(config["schedule"]),
                               parameterization=diffusion["parameterization"],
                               weighting=diffusion["weighting"], ema_decay=None,
                               num_steps=n, name=f"sampler_{n}")
        stages.append((stage, n, model))
    return stages


def _default_name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def export_workdir(workdir: str, export_dir: str, name: str | None = None,
                   overwrite: bool = False, version: int | None = DEFAULT_VERSION,
                   serving_root: str = SERVING_ROOT, max_steps: int | None = None,
                   max_batch: int | None = None) -> dict:
    """Exports every finished stage of `workdir` (see the module docstring).

    Needs no gin config: the models come from `config.json` and the `final`
    checkpoints. Only reads `workdir`. On a backend other than TensorFlow it runs in a
    TensorFlow subprocess.

    Args:
        workdir: a run's work directory (must exist).
        export_dir, name (default: the workdir's name), overwrite, version,
        serving_root, max_steps, max_batch: as `export_stages`.

    Returns:
        `export_stages`' result.
    """
    name = _check_name(name or _default_name(workdir))
    _check_workdir(workdir)
    if keras.backend.backend() != "tensorflow":
        return _export_in_subprocess(workdir, export_dir, name, overwrite, version,
                                     serving_root, max_steps, max_batch)
    return export_stages(load_workdir_stages(workdir), export_dir, name, overwrite,
                         version, serving_root, max_steps, max_batch)


def export_experiment(experiment, export_dir: str, name: str | None = None,
                      overwrite: bool = False, version: int | None = DEFAULT_VERSION,
                      serving_root: str = SERVING_ROOT, max_steps: int | None = None,
                      max_batch: int | None = None) -> dict:
    """Exports the teacher and every finished stage of a `pipeline.Experiment`.

    Re-running it on a finished run is a no-op (every stage up to date).

    Args:
        experiment: a `pipeline.Experiment` (its `workdir` and `stage_models()`).
        export_dir, name (default: the workdir's name), overwrite, version,
        serving_root, max_steps, max_batch: as `export_stages`.

    Returns:
        `export_stages`' result.
    """
    name = _check_name(name or _default_name(experiment.workdir))
    if keras.backend.backend() != "tensorflow":
        # The checkpoints are backend-neutral npz; TensorFlow writes the SavedModels.
        return _export_in_subprocess(experiment.workdir, export_dir, name, overwrite,
                                     version, serving_root, max_steps, max_batch)
    return export_stages(experiment.stage_models(), export_dir, name, overwrite, version,
                         serving_root, max_steps, max_batch)


_EXISTS_EXIT_CODE = 3
_ERROR_EXIT_CODE = 4
_RESULT_PREFIX = "[export-result] "
# Imports the package from the folder given first, ahead of the working directory
# (`python -m` would put the cwd first) and of any installed copy.
_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from keras_progdist.export import main; sys.exit(main())")


def package_parent() -> str:
    """The folder holding the running `keras_progdist` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_command(workdir, export_dir, name, overwrite, version, serving_root,
                        max_steps, max_batch) -> tuple:
    """`(command, env)` of the TensorFlow export subprocess.

    The child must run this very code (a JAX run exported by another checkout or an
    installed release would silently write other graphs), so the running package's
    parent goes first both on the child's `sys.path` and in `PYTHONPATH` (which its
    own children inherit).
    """
    parent = package_parent()
    command = [sys.executable, "-c", _BOOTSTRAP, parent,
               "--workdir", os.path.abspath(workdir),
               "--export_dir", os.path.abspath(export_dir), "--name", name,
               "--serving_root", serving_root]
    command += [] if version is None else ["--version", str(version)]
    command += [] if max_steps is None else ["--max_steps", str(max_steps)]
    command += [] if max_batch is None else ["--max_batch", str(max_batch)]
    command += ["--overwrite"] if overwrite else []
    pythonpath = [parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                             if p and p != parent]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join(pythonpath)}
    return command, env


def _export_in_subprocess(workdir, export_dir, name, overwrite, version, serving_root,
                          max_steps=None, max_batch=None):
    command, env = _subprocess_command(workdir, export_dir, name, overwrite, version,
                                       serving_root, max_steps, max_batch)
    shown = " ".join(command[:2] + ["'<bootstrap>'"] + command[3:])
    print(f"[export] backend {keras.backend.backend()}: exporting through TensorFlow "
          f"in a subprocess: {shown}", flush=True)
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.splitlines()
    for line in lines:
        if not line.startswith(_RESULT_PREFIX):
            print(line, flush=True)
    last = (result.stderr.strip().splitlines() or [""])[-1]
    for prefix in ("ExportExistsError: ", "ExportError: "):
        last = last[len(prefix):] if last.startswith(prefix) else last
    if result.returncode == _EXISTS_EXIT_CODE:
        raise ExportExistsError(last)
    if result.returncode == _ERROR_EXIT_CODE:
        raise ExportError(last)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise ExportError(f"The TensorFlow export subprocess failed (exit "
                          f"{result.returncode}): {shown}\n{tail}")
    for line in reversed(lines):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise ExportError(f"The export subprocess printed no result: {shown}")


def main(argv=None) -> int:
    """`python -m keras_progdist.export`: exports a work directory; returns the exit code
    (0, 2 wrong backend, 3 ExportExistsError, 4 ExportError)."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_progdist.export",
        description="Exports a keras-progdist work directory for TF Serving and Keras.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--name", default=None, help="default: the workdir's name")
    parser.add_argument("--version", type=int, default=DEFAULT_VERSION,
                        help="default: the current version if up to date, else the next")
    parser.add_argument("--serving_root", default=SERVING_ROOT,
                        help="where the server sees export_dir (models.config base_path)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help=f"most steps generate accepts (default max({DEFAULT_MAX_STEPS}"
                             ", 4 x the stage's steps))")
    parser.add_argument("--max_batch", type=int, default=None,
                        help=f"most images per request (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        print("Set KERAS_BACKEND=tensorflow to export.", file=sys.stderr)
        return 2
    try:
        result = export_workdir(args.workdir, args.export_dir, args.name, args.overwrite,
                                args.version, args.serving_root, args.max_steps,
                                args.max_batch)
    except ExportExistsError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return _EXISTS_EXIT_CODE
    except ExportError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return _ERROR_EXIT_CODE
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
