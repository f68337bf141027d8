"""Per-stage exports for serving: TF Serving SavedModels and `.keras` files.

For the teacher and every finished distillation stage of a run, `export_experiment` /
`export_workdir` write

    <export_dir>/<name>/models.config                    TF Serving model config, all stages
    <export_dir>/<name>/<name>-<N>steps/<version>/       SavedModel (TF Serving layout)
        saved_model.pb, variables/, fingerprint.pb
        assets.extra/tf_serving_warmup_requests          PredictionLogs for serving_default
    <export_dir>/<name>/<name>-<N>steps.keras            DiffusionModel(ema_decay=None,
                                                         num_steps=N) for keras.saving

Each SavedModel holds the whole DDIM loop in its graph (`samplers.ddim_sample`, the same
function `DiffusionModel.sample` runs), so one model serves any step count:

    serving_default  seed int32 [B] (+ label int32 [B]) -> images uint8 [B, H, W, C]
                     DDIM in the stage's own N steps from `noise_from_seeds(seed)`, clipped
    generate         noise float32 [B, H, W, C], steps int32 [] (+ label)
                     -> images float32 [B, H, W, C] in [-1, 1] (DDIM, clipped)
    denoise          z float32 [B, H, W, C], t float32 [B] (+ label)
                     -> x_hat, eps_hat float32 [B, H, W, C]

Inputs are checked inside the graph, each message naming the input: shapes with
`tf.ensure_shape` (a loaded signature, like TF Serving, runs whatever shape it is fed),
values with `tf.debugging` asserts (negative seed, label outside `[0, num_classes)`,
`steps <= 0`, `t` outside [0, 1]). A bad request fails with `InvalidArgumentError` and
the model keeps serving.

SavedModels are written with the TensorFlow backend. Checkpoints are backend-neutral
npz files, so a run trained on JAX is exported by a TensorFlow subprocess
(`python -m keras_progdist.export --workdir ... --export_dir ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np

from keras_progdist import checkpoint, samplers
from keras_progdist.diffusion import DiffusionModel, network_denoise
from keras_progdist.networks.unet import UNet
from keras_progdist.schedules import get_schedule

DEFAULT_VERSION = 1
MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SERVING_ROOT = "/models"
SERVING_API_INSTALL = "pip install --no-deps tensorflow-serving-api==2.21.0"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExportError(ValueError):
    """A work directory or export target that cannot be exported (to)."""


class ExportExistsError(FileExistsError):
    """The export folder already holds that version; pass `overwrite=True` to replace."""


# -- naming ------------------------------------------------------------------------------
def model_name(name: str, num_steps: int) -> str:
    """TF Serving model name of a stage: `<name>-<N>steps`."""
    return f"{name}-{num_steps}steps"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ExportError(f"Export name {name!r} must be letters, digits, '_', '.' or '-' "
                          "(it becomes a folder, a TF Serving model name and a URL part).")
    return name


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ExportError(f"version must be a positive integer (TF Serving's numeric "
                          f"version folder), got {version!r}.")
    return int(version)


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


def _with_checks(checks, *tensors):
    import tensorflow as tf

    with tf.control_dependencies(checks):
        return tuple(None if x is None else tf.identity(x) for x in tensors)


def build_archive(model: DiffusionModel, num_steps: int | None = None):
    """A `keras.export.ExportArchive` with the three signatures of `model`.

    Args:
        model: a `DiffusionModel` (its sampling network is exported).
        num_steps: the step count of `serving_default` (default: `model.num_steps`).
    """
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise ExportError("SavedModel export needs the TensorFlow backend; use "
                          "export_workdir, which runs a TensorFlow subprocess.")
    num_steps = int(num_steps or model.num_steps)
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
        checks = [tf.debugging.assert_non_negative(seed, message="seed must be >= 0")]
        if label is not None:
            checks += _label_checks(label, tf.shape(seed)[0], num_classes, "seed")
        seed, label = _with_checks(checks, seed, label)
        noise = noise_from_seeds(seed, image_shape)
        return {"images": to_uint8(ddim(noise, num_steps, label))}

    def generate(noise, steps, label=None):
        noise, steps = shaped(noise, image_spec), shaped(steps, [])
        label = shaped(label, [None])
        checks = [tf.debugging.assert_positive(steps, message="steps must be >= 1")]
        if label is not None:
            checks += _label_checks(label, tf.shape(noise)[0], num_classes, "noise image")
        noise, steps, label = _with_checks(checks, noise, steps, label)
        return {"images": ddim(noise, steps, label)}

    def denoise(z, t, label=None):
        z, t, label = shaped(z, image_spec), shaped(t, [None]), shaped(label, [None])
        checks = [tf.debugging.assert_equal(tf.shape(t)[0], tf.shape(z)[0],
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
    (the export dir mounted at `/models` in the `tensorflow/serving` container).
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
    _atomic_write_text(path, text_format.MessageToString(config))
    return path


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- one stage ---------------------------------------------------------------------------
def stage_paths(export_dir: str, name: str, num_steps: int,
                version: int = DEFAULT_VERSION) -> dict:
    """Where a stage's files go: `root`, `base_path`, `saved_model` (version dir), `keras`."""
    root = os.path.join(export_dir, name)
    serving_name = model_name(name, num_steps)
    base = os.path.join(root, serving_name)
    return {"root": root, "model_name": serving_name, "base_path": base,
            "saved_model": os.path.join(base, str(version)),
            "keras": os.path.join(root, f"{serving_name}.keras")}


def export_stage(model: DiffusionModel, export_dir: str, name: str,
                 num_steps: int | None = None, version: int = DEFAULT_VERSION,
                 overwrite: bool = False, warmup_batch_sizes=(1,)) -> dict:
    """Exports one stage: SavedModel version folder (+ warm-up) and `.keras` file.

    The `.keras` file holds `DiffusionModel(ema_decay=None, num_steps=N)` around the
    stage's sampling network. Both are written under temporary names and renamed into
    place, so TF Serving never sees a half-written version.

    Raises:
        ExportExistsError: the version folder exists and `overwrite` is False.
    """
    num_steps = int(num_steps or model.num_steps)
    version = _check_version(version)
    paths = stage_paths(export_dir, _check_name(name), num_steps, version)
    target = paths["saved_model"]
    if os.path.exists(target) and not overwrite:
        raise ExportExistsError(f"{target} already holds version {version} of "
                                f"{paths['model_name']}; pass overwrite=True (--overwrite) "
                                "to replace it, or export another version.")
    os.makedirs(paths["base_path"], exist_ok=True)
    # A dot name is not a numeric version, so TF Serving ignores it while it is written.
    tmp = os.path.join(paths["base_path"], f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_archive(model, num_steps).write_out(tmp, verbose=False)
    write_warmup_requests(tmp, paths["model_name"], model.num_classes, warmup_batch_sizes)
    if os.path.exists(target):
        old = os.path.join(paths["base_path"], f".old-{version}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)

    sampler = sampling_copy(model, num_steps)
    keras_tmp = f"{paths['keras']}.tmp-{os.getpid()}.keras"
    with warnings.catch_warnings():
        # DiffusionModel.call is never run, so Keras calls it unbuilt; its network is
        # built and every weight is saved.
        warnings.filterwarnings("ignore", message=".*has not yet been built.*")
        sampler.save(keras_tmp)
    os.replace(keras_tmp, paths["keras"])
    return {"num_steps": num_steps, "model_name": paths["model_name"],
            "saved_model": target, "keras": paths["keras"]}


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
                  version: int = DEFAULT_VERSION, serving_root: str = SERVING_ROOT) -> dict:
    """Exports `[(stage, num_steps, DiffusionModel)]` and writes `models.config`.

    Every target is checked before anything is written, so a refused export leaves the
    export folder as it was.
    """
    name = _check_name(name)
    version = _check_version(version)
    _serving_apis()  # fail before the slow part when the protos are missing
    if not stages:
        raise ExportError("Nothing to export: no finished stage.")
    if not overwrite:
        existing = [stage_paths(export_dir, name, n, version)["saved_model"]
                    for _, n, _ in stages]
        existing = [p for p in existing if os.path.exists(p)]
        if existing:
            raise ExportExistsError(
                f"Version {version} is already exported: {', '.join(existing)}. Pass "
                "overwrite=True (--overwrite) to replace it, or export another version.")
    exported = []
    for stage, n, model in stages:
        record = export_stage(model, export_dir, name, n, version, overwrite)
        exported.append({"stage": stage, **record})
        print(f"[export] {stage}: {record['saved_model']} and {record['keras']}",
              flush=True)
    root = os.path.join(export_dir, name)
    config = write_models_config(root, name, serving_root)
    return {"name": name, "version": version, "root": root, "models_config": config,
            "stages": exported}


# -- from a run --------------------------------------------------------------------------
def load_workdir_stages(workdir: str) -> list:
    """`[(stage, num_steps, DiffusionModel)]` of a work directory, without gin.

    Rebuilds the network from `config.json` and loads each finished stage's
    `final` checkpoint (teacher, then students from most to fewest steps).
    """
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
                   overwrite: bool = False, version: int = DEFAULT_VERSION,
                   serving_root: str = SERVING_ROOT) -> dict:
    """Exports every finished stage of `workdir` (see the module docstring).

    Needs no gin config: the models come from `config.json` and the `final`
    checkpoints. On a backend other than TensorFlow it runs in a TensorFlow subprocess.

    Returns:
        `{"name", "version", "root", "models_config", "stages": [...]}`.
    """
    name = _check_name(name or _default_name(workdir))
    if keras.backend.backend() != "tensorflow":
        return _export_in_subprocess(workdir, export_dir, name, overwrite, version,
                                     serving_root)
    return export_stages(load_workdir_stages(workdir), export_dir, name, overwrite,
                         version, serving_root)


def export_experiment(experiment, export_dir: str, name: str | None = None,
                      overwrite: bool = False, version: int = DEFAULT_VERSION,
                      serving_root: str = SERVING_ROOT) -> dict:
    """Exports the teacher and every finished stage of a `pipeline.Experiment`."""
    name = _check_name(name or _default_name(experiment.workdir))
    if keras.backend.backend() != "tensorflow":
        # The checkpoints are backend-neutral npz; TensorFlow writes the SavedModels.
        return _export_in_subprocess(experiment.workdir, export_dir, name, overwrite,
                                     version, serving_root)
    return export_stages(experiment.stage_models(), export_dir, name, overwrite, version,
                         serving_root)


_EXISTS_EXIT_CODE = 3
_RESULT_PREFIX = "[export-result] "


def _export_in_subprocess(workdir, export_dir, name, overwrite, version, serving_root):
    command = [sys.executable, "-m", "keras_progdist.export", "--workdir", workdir,
               "--export_dir", export_dir, "--name", name, "--version", str(version),
               "--serving_root", serving_root] + (["--overwrite"] if overwrite else [])
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    print(f"[export] backend {keras.backend.backend()}: exporting through TensorFlow "
          f"in a subprocess: {' '.join(command)}", flush=True)
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.splitlines()
    for line in lines:
        if not line.startswith(_RESULT_PREFIX):
            print(line, flush=True)
    if result.returncode == _EXISTS_EXIT_CODE:
        raise ExportExistsError(result.stderr.strip().splitlines()[-1])
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise ExportError(f"The TensorFlow export subprocess failed (exit "
                          f"{result.returncode}): {' '.join(command)}\n{tail}")
    for line in reversed(lines):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise ExportError(f"The export subprocess printed no result: {' '.join(command)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keras_progdist.export",
        description="Exports a keras-progdist work directory for TF Serving and Keras.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--name", default=None, help="default: the workdir's name")
    parser.add_argument("--version", type=int, default=DEFAULT_VERSION)
    parser.add_argument("--serving_root", default=SERVING_ROOT,
                        help="where the server sees export_dir (models.config base_path)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        print("Set KERAS_BACKEND=tensorflow to export.", file=sys.stderr)
        return 2
    try:
        result = export_workdir(args.workdir, args.export_dir, args.name, args.overwrite,
                                args.version, args.serving_root)
    except ExportExistsError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return _EXISTS_EXIT_CODE
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
