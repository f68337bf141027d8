"""Export for serving: TF Serving SavedModels and `.keras` files of every stage.

A finished work directory (a 4-step teacher and its 2-step student, random weights) is
written once and exported through `training.run(mode="export")`.
Each SavedModel is then checked in a fresh Python process, as a server would load it:
every signature, determinism per seed, `generate` against the in-memory model's DDIM,
a DDIM loop written here over the `denoise` signature, the warm-up records, the `.keras`
file, bad requests and the serving limits. Versioning, racing exporters, stale
temporaries and the JAX subprocess use small in-memory models or the same work directory.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

import gin
import keras_progdist
from keras_progdist import export, fileio, training
from keras_progdist.diffusion import DiffusionModel
from keras_progdist.export import stages as export_stages
from keras_progdist.export import subprocess_export
from keras_progdist.export import versions as export_versions
from keras_progdist.networks.unet import UNet

pytestmark = pytest.mark.tensorflow_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers.finished_workdir import make_finished_workdir

# The network of `make_finished_workdir` (16x16 digits), and the ladder of its work
# directory: a 4-step teacher and its 2-step student.
GIN_BINDINGS = [
    "UNet.channels=8", "UNet.channel_mult=(1,)", "UNet.num_res_blocks=1",
    "UNet.attention_resolutions=()", "UNet.num_groups=4",
    "distill.teacher_steps=4", "distill.min_steps=2",
]
NAME = "tiny"
NOISE_SEED = 7


def _parse_gin():
    # tiny.gin configures `evaluate`, registered by the configuration schema.
    import keras_progdist.training.config  # noqa: F401
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")],
                                        GIN_BINDINGS)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A finished work directory, its export, and the in-memory models' DDIM samples.

    Export reads what training leaves (config.json, each stage's final checkpoint), so
    the work directory is written with random weights, not trained (that took 30 s);
    `test_pipeline` exports trained runs end to end."""
    base = tmp_path_factory.mktemp("export")
    workdir, export_dir = str(base / "workdir"), str(base / "saved_models")
    make_finished_workdir(workdir, teacher_steps=4, students=(2,), image_shape=(16, 16, 1))
    _parse_gin()
    try:
        stages = training.run(workdir, "export", export_dir=export_dir,
                              experiment_name=NAME, verbose=0).stage_models(
                                  with_guidance=True)
    finally:
        gin.clear_config()
    noise = keras.random.normal((3,) + stages[0][2].image_shape, seed=NOISE_SEED)
    noise = keras.ops.convert_to_numpy(noise)
    references = {n: model.sample(noise=noise, num_steps=n) for _, n, model in stages}
    with open(os.path.join(workdir, "config.json")) as f:
        schedule = json.load(f)["schedule"]
    return {"workdir": workdir, "export_dir": export_dir, "noise": noise,
            "references": references, "steps": [n for _, n, _ in stages],
            "schedule": schedule, "base": base}


def _run_python(code: str, *args, backend: str = "tensorflow", timeout: int = 300):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


# Runs in a fresh process: loads one stage the way a server (and a Keras user) would.
STAGE_CHECK = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import keras
    # Importing the package registers DiffusionModel, UNet and Schedule.
    import keras_progdist
    from tensorflow_serving.apis import prediction_log_pb2

    saved_model, keras_path, steps, schedule, inputs, out = sys.argv[1:]
    steps = int(steps)
    schedule = json.loads(schedule)
    noise = np.load(inputs)["noise"]
    loaded = tf.saved_model.load(saved_model)
    serve = loaded.signatures["serving_default"]
    generate = loaded.signatures["generate"]
    denoise = loaded.signatures["denoise"]
    results = {"signatures": sorted(loaded.signatures.keys())}

    seeds = tf.constant([3, 1, 2], tf.int32)
    first = serve(seed=seeds)["images"].numpy()
    again = serve(seed=seeds)["images"].numpy()
    alone = serve(seed=tf.constant([1], tf.int32))["images"].numpy()
    # The stage's own step count from the per-seed noise: what serving_default runs.
    seeded = tf.map_fn(lambda s: tf.random.stateless_normal(noise.shape[1:], [s, 0]),
                       seeds, fn_output_signature=tf.float32)
    from_noise = generate(noise=seeded, steps=tf.constant(steps))["images"].numpy()

    images = generate(noise=tf.constant(noise), steps=tf.constant(steps))["images"].numpy()

    # DDIM (eta = 0, clipped x_hat) over the denoise signature, schedule in numpy.
    b = np.arctan(np.exp(-schedule["logsnr_max"] / 2.0))
    a = np.arctan(np.exp(-schedule["logsnr_min"] / 2.0)) - b
    def alpha_sigma(t):
        logsnr = -2.0 * np.log(np.tan(a * t + b))
        return np.sqrt(1.0 / (1.0 + np.exp(-logsnr))), np.sqrt(1.0 / (1.0 + np.exp(logsnr)))
    z = noise.astype(np.float64)
    for i in range(steps):
        t, s = (steps - i) / steps, (steps - i - 1) / steps
        out_ = denoise(z=tf.constant(z, tf.float32),
                       t=tf.constant(np.full(len(z), t), tf.float32))
        x_hat = np.clip(out_["x_hat"].numpy().astype(np.float64), -1.0, 1.0)
        alpha_t, sigma_t = alpha_sigma(t)
        eps_hat = (z - alpha_t * x_hat) / sigma_t
        if s > 0:
            alpha_s, sigma_s = alpha_sigma(s)
            z = alpha_s * x_hat + sigma_s * eps_hat
        else:
            z = x_hat
    raw = denoise(z=tf.constant(noise), t=tf.constant([0.5] * len(noise), tf.float32))

    warmups = []
    path = saved_model + "/assets.extra/tf_serving_warmup_requests"
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        fn = loaded.signatures[request.model_spec.signature_name]
        reply = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
        warmups.append({"model": request.model_spec.name,
                        "signature": request.model_spec.signature_name,
                        "inputs": sorted(request.inputs.keys()),
                        "images": list(reply["images"].shape),
                        "dtype": reply["images"].dtype.name})

    restored = keras.saving.load_model(keras_path)  # safe_mode on, no custom_objects
    from_keras = restored.sample(noise=noise, num_steps=steps)
    results.update(num_steps=restored.num_steps, ema_decay=restored.ema_decay,
                   keras_class=type(restored).__name__, warmups=warmups)
    np.savez(out, first=first, again=again, alone=alone, from_noise=from_noise,
             images=images, manual=z, from_keras=from_keras,
             x_hat=raw["x_hat"].numpy(), eps_hat=raw["eps_hat"].numpy())
    print("RESULTS " + json.dumps(results))
""")


def _check_stage(exported, steps, tmp_path):
    paths = export.stage_paths(exported["export_dir"], NAME, steps)
    inputs, out = str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")
    np.savez(inputs, noise=exported["noise"])
    stdout = _run_python(STAGE_CHECK, paths["saved_model"], paths["keras"], str(steps),
                         json.dumps(exported["schedule"]), inputs, out)
    results = json.loads(stdout.split("RESULTS ", 1)[1])
    return results, dict(np.load(out)), paths


@pytest.mark.parametrize("stage", ["teacher", "smallest"])
def test_each_stage_serves_in_a_fresh_process(exported, stage, tmp_path):
    steps = exported["steps"][0] if stage == "teacher" else exported["steps"][-1]
    results, arrays, paths = _check_stage(exported, steps, tmp_path)
    assert results["signatures"] == ["denoise", "generate", "serving_default"]

    first, again, alone = arrays["first"], arrays["again"], arrays["alone"]
    assert first.dtype == np.uint8 and first.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(first, again)  # same seeds, same bytes
    assert not np.array_equal(first[0], first[1])  # different seeds, different images
    # Seed 1 alone or inside a batch: the noise is drawn per seed.
    assert np.abs(alone[0].astype(int) - first[1].astype(int)).max() <= 1
    # serving_default is generate(stage's own N steps) on the per-seed noise, as uint8.
    expected = np.clip(np.round((arrays["from_noise"] + 1.0) * 127.5), 0, 255)
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1

    reference = exported["references"][steps]
    np.testing.assert_allclose(arrays["images"], reference, atol=1e-4)
    np.testing.assert_allclose(arrays["manual"], arrays["images"], atol=1e-4)
    assert arrays["images"].min() >= -1.0 and arrays["images"].max() <= 1.0
    assert arrays["x_hat"].shape == arrays["eps_hat"].shape == (3, 16, 16, 1)

    assert results["warmups"] == [{"model": f"{NAME}-{steps}steps",
                                   "signature": "serving_default", "inputs": ["seed"],
                                   "images": [1, 16, 16, 1], "dtype": "uint8"}]

    assert results["keras_class"] == "DiffusionModel"
    assert results["num_steps"] == steps and results["ema_decay"] is None
    np.testing.assert_allclose(arrays["from_keras"], arrays["images"], atol=1e-4)


def test_layout_and_models_config(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root = os.path.join(exported["export_dir"], NAME)
    names = [f"{NAME}-{n}steps" for n in exported["steps"]]
    assert sorted(os.listdir(root)) == sorted(
        names + [f"{n}.keras" for n in names] + [f"{n}.keras.json" for n in names]
        + ["models.config"])
    for n, steps in zip(names, exported["steps"]):
        assert os.listdir(os.path.join(root, n)) == ["1"]
        version = os.path.join(root, n, "1")
        assert os.path.exists(os.path.join(version, "saved_model.pb"))
        assert os.path.exists(os.path.join(version, "variables", "variables.index"))
        meta = export.read_version_metadata(version)
        assert meta["version"] == 1 and meta["num_steps"] == steps
        assert meta["model_name"] == n and len(meta["weights_sha256"]) == 64
        with open(os.path.join(root, f"{n}.keras.json")) as f:
            keras_meta = json.load(f)
        assert keras_meta["weights_sha256"] == meta["weights_sha256"]
        assert keras_meta["version"] == 1
        assert keras_meta["file_sha256"] == fileio.sha256_file(os.path.join(root, f"{n}.keras"))
    with open(os.path.join(root, "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    listed = [(c.name, c.base_path, c.model_platform)
              for c in config.model_config_list.config]
    assert listed == [(n, f"/models/{NAME}/{n}", "tensorflow") for n in names]


def test_saved_model_cli_lists_the_signatures(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    paths = export.stage_paths(exported["export_dir"], NAME, exported["steps"][-1])
    result = subprocess.run([cli, "show", "--all", "--dir", paths["saved_model"]],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    sections = {}
    for part in text.split("signature_def['")[1:]:
        sections[part.split("'")[0]] = part.split("Concrete Functions")[0]
    assert {"serving_default", "generate", "denoise"} <= set(sections)

    def io(section, kind, key, dtype, shape):
        block = section.split(f"The given SavedModel SignatureDef contains the following "
                              f"{kind}(s):")[1]
        entry = block.split(f"['{key}'] tensor_info:")[1].split("name:")[0]
        assert f"dtype: {dtype}" in entry and f"shape: {shape}" in entry, (key, entry)

    io(sections["serving_default"], "input", "seed", "DT_INT32", "(-1)")
    io(sections["serving_default"], "output", "images", "DT_UINT8", "(-1, 16, 16, 1)")
    io(sections["generate"], "input", "noise", "DT_FLOAT", "(-1, 16, 16, 1)")
    io(sections["generate"], "input", "steps", "DT_INT32", "()")
    io(sections["generate"], "output", "images", "DT_FLOAT", "(-1, 16, 16, 1)")
    io(sections["denoise"], "input", "z", "DT_FLOAT", "(-1, 16, 16, 1)")
    io(sections["denoise"], "input", "t", "DT_FLOAT", "(-1)")
    io(sections["denoise"], "output", "x_hat", "DT_FLOAT", "(-1, 16, 16, 1)")
    io(sections["denoise"], "output", "eps_hat", "DT_FLOAT", "(-1, 16, 16, 1)")


def _expect_refused(fn, needle, **inputs):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match=needle):
        fn(**{k: tf.constant(v) for k, v in inputs.items()})


def test_bad_requests_fail_naming_the_input_and_serving_goes_on(exported):
    import tensorflow as tf

    paths = export.stage_paths(exported["export_dir"], NAME, exported["steps"][-1])
    loaded = tf.saved_model.load(paths["saved_model"])
    serve, generate = loaded.signatures["serving_default"], loaded.signatures["generate"]
    denoise = loaded.signatures["denoise"]
    good = serve(seed=tf.constant([5]))["images"].numpy()
    noise = exported["noise"]

    _expect_refused(serve, "seed must be >= 0", seed=np.array([1, -2], np.int32))
    _expect_refused(serve, r"tensor seed \[1,2\] is not compatible",
                    seed=np.array([[1, 2]], np.int32))
    _expect_refused(serve, r"tensor seed \[\] is not compatible", seed=np.int32(3))
    _expect_refused(generate, "steps must be >= 1", noise=noise, steps=np.int32(0))
    _expect_refused(generate, r"tensor noise \[3,8,8,1\] is not compatible",
                    noise=noise[:, :8, :8], steps=np.int32(2))
    _expect_refused(denoise, r"t must be in \[0, 1\]", z=noise,
                    t=np.array([0.5, 1.5, 0.2], np.float32))
    _expect_refused(denoise, r"t must be in \[0, 1\]", z=noise,
                    t=np.array([-0.1, 0.5, 0.2], np.float32))
    _expect_refused(denoise, "t must hold one time per z", z=noise,
                    t=np.array([0.5], np.float32))

    np.testing.assert_array_equal(serve(seed=tf.constant([5]))["images"].numpy(), good)
    assert generate(noise=tf.constant(noise), steps=tf.constant(1))["images"].shape == \
        noise.shape


def test_class_conditional_signatures_take_and_check_labels(tmp_path):
    import tensorflow as tf

    network = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                   attention_resolutions=(), num_groups=4, num_classes=3, name="network")
    # The output convolution starts at zero, which would make every class alike.
    rng = np.random.default_rng(0)
    network.set_weights([w if w.any() else 0.1 * rng.standard_normal(w.shape)
                         for w in network.get_weights()])
    model = DiffusionModel(network, ema_decay=None, num_steps=2)
    record = export.export_stage(model, str(tmp_path), "cond", overwrite=False)
    loaded = tf.saved_model.load(record["saved_model"])
    serve, generate = loaded.signatures["serving_default"], loaded.signatures["generate"]
    denoise = loaded.signatures["denoise"]

    seed, label = tf.constant([4, 4]), tf.constant([0, 2])
    images = serve(seed=seed, label=label)["images"].numpy()
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 1)
    assert not np.array_equal(images[0], images[1])  # same noise, different classes
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    generated = generate(noise=tf.constant(noise), steps=tf.constant(2),
                         label=label)["images"].numpy()
    np.testing.assert_allclose(generated, model.sample(noise=noise, num_steps=2,
                                                       label=[0, 2]), atol=1e-4)
    assert set(denoise(z=tf.constant(noise), t=tf.constant([0.3, 0.7]), label=label)) == \
        {"x_hat", "eps_hat"}

    _expect_refused(serve, r"label must be in \[0, 3\)", seed=np.array([1, 2], np.int32),
                    label=np.array([0, 3], np.int32))
    _expect_refused(serve, r"label must be in \[0, 3\)", seed=np.array([1], np.int32),
                    label=np.array([-1], np.int32))
    _expect_refused(serve, "label must hold one class per seed",
                    seed=np.array([1, 2], np.int32), label=np.array([0], np.int32))
    _expect_refused(generate, r"label must be in \[0, 3\)", noise=noise,
                    steps=np.int32(2), label=np.array([0, 5], np.int32))
    _expect_refused(denoise, r"label must be in \[0, 3\)", z=noise,
                    t=np.array([0.3, 0.7], np.float32), label=np.array([7, 0], np.int32))
    np.testing.assert_array_equal(serve(seed=seed, label=label)["images"].numpy(), images)

    from tensorflow_serving.apis import prediction_log_pb2
    path = os.path.join(record["saved_model"], "assets.extra", "tf_serving_warmup_requests")
    for raw in tf.data.TFRecordDataset(path):
        request = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
        assert sorted(request.inputs) == ["label", "seed"]
        serve(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})


@pytest.mark.parametrize("kind", ["classifier_free", "guidance_conditioned"])
def test_guided_signatures_take_label_and_guidance(tmp_path, kind):
    """A classifier-free guided teacher (one doubled network call per step) and a
    guidance-conditioned student (w as an input) both serve
    `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)` with `guidance` per image."""
    import tensorflow as tf

    network = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                   attention_resolutions=(), num_groups=4, num_classes=3, null_class=True,
                   guidance_conditioned=kind == "guidance_conditioned", name="network")
    rng = np.random.default_rng(0)
    network.set_weights([w + 0.1 * rng.standard_normal(w.shape).astype(w.dtype)
                         for w in network.get_weights()])
    model = DiffusionModel(network, ema_decay=None, num_steps=2)
    assert model.guided
    record = export.export_stage(model, str(tmp_path), kind.replace("_", "-"),
                                 overwrite=False)
    loaded = tf.saved_model.load(record["saved_model"])
    serve, generate = loaded.signatures["serving_default"], loaded.signatures["generate"]
    denoise = loaded.signatures["denoise"]

    noise = np.random.default_rng(1).standard_normal((3, 8, 8, 1)).astype(np.float32)
    label = np.array([0, 2, 2], np.int32)
    guidance = np.array([0.0, 0.0, 3.0], np.float32)
    generated = generate(noise=tf.constant(noise), steps=tf.constant(2),
                         label=tf.constant(label),
                         guidance=tf.constant(guidance))["images"].numpy()
    np.testing.assert_allclose(generated, model.sample(noise=noise, num_steps=2, label=label,
                                                       guidance=guidance), atol=1e-4)
    assert np.abs(generated[1] - generated[2]).max() > 1e-3  # guidance acts per image
    x_hat = denoise(z=tf.constant(noise), t=tf.constant([0.3, 0.5, 0.7]),
                    label=tf.constant(label), guidance=tf.constant(guidance))["x_hat"]
    expected, _ = model.denoise(noise, np.array([0.3, 0.5, 0.7], np.float32), label,
                                guidance=guidance)
    np.testing.assert_allclose(x_hat.numpy(), keras.ops.convert_to_numpy(expected),
                               atol=1e-5)
    images = serve(seed=tf.constant([4, 4]), label=tf.constant([1, 1]),
                   guidance=tf.constant([0.0, 2.0]))["images"].numpy()
    assert images.dtype == np.uint8 and not np.array_equal(images[0], images[1])

    _expect_refused(serve, "guidance must hold one strength per seed",
                    seed=np.array([1, 2], np.int32), label=np.array([0, 1], np.int32),
                    guidance=np.array([1.0], np.float32))
    _expect_refused(generate, "guidance must be finite", noise=noise[:1],
                    steps=np.int32(2), label=np.array([0], np.int32),
                    guidance=np.array([np.nan], np.float32))

    with open(os.path.join(record["saved_model"], export.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["guided"] is True
    from tensorflow_serving.apis import prediction_log_pb2
    path = os.path.join(record["saved_model"], "assets.extra", "tf_serving_warmup_requests")
    for raw in tf.data.TFRecordDataset(path):
        request = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
        assert sorted(request.inputs) == ["guidance", "label", "seed"]
        serve(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})


def test_guided_stage_one_is_exported_beside_its_teacher_under_its_own_name(tmp_path):
    """Guided distillation's stage one samples in its teacher's step count; exported with
    the teacher it is a model of its own, not the teacher's next version."""
    def guided_model(conditioned, seed):
        network = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                       attention_resolutions=(), num_groups=4, num_classes=3,
                       null_class=True, guidance_conditioned=conditioned, name="network")
        rng = np.random.default_rng(seed)
        network.set_weights([w + 0.1 * rng.standard_normal(w.shape).astype(w.dtype)
                             for w in network.get_weights()])
        return DiffusionModel(network, ema_decay=None, num_steps=2)

    stages = [("teacher", 2, guided_model(False, 0)), ("guidance", 2, guided_model(True, 1))]
    result = export.export_stages(stages, str(tmp_path), "g")
    assert [(r["stage"], r["model_name"], r["version"], r["status"])
            for r in result["stages"]] == [("teacher", "g-2steps", 1, "exported"),
                                           ("guidance", "g-guidance-2steps", 1, "exported")]
    assert os.listdir(tmp_path / "g" / "g-2steps") == ["1"]
    with open(result["models_config"]) as f:
        assert re.findall(r'name: "([^"]+)"', f.read()) == ["g-guidance-2steps", "g-2steps"]
    stage_one = keras.saving.load_model(str(tmp_path / "g" / "g-guidance-2steps.keras"),
                                        safe_mode=True)
    assert stage_one.network.guidance_conditioned
    # Exported again: both up to date, nothing written.
    again = export.export_stages(stages, str(tmp_path), "g")
    assert again["up_to_date"] and [r["version"] for r in again["stages"]] == [1, 1]


def _snapshot(top):
    """Every path under `top` with its mtime (ns) and, for files, size: a folder whose
    snapshot is unchanged had nothing written, created, renamed or removed in it."""
    out = {".": os.lstat(top).st_mtime_ns}
    for root, dirs, files in os.walk(top):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            stat = os.lstat(path)
            out[os.path.relpath(path, top)] = (stat.st_mtime_ns,
                                               stat.st_size if entry in files else None)
    return out


def _small_model(seed, num_steps=2):
    """An 8x8 DiffusionModel whose weights depend on `seed` (fast to export)."""
    network = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                   attention_resolutions=(), num_groups=4, name="network")
    rng = np.random.default_rng(seed)
    network.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                         for w in network.get_weights()])
    return DiffusionModel(network, ema_decay=None, num_steps=num_steps)


class _FakeArchive:
    """Stands in for the SavedModel where only the version bookkeeping is tested."""

    def write_out(self, path, verbose=False):
        os.makedirs(path)
        with open(os.path.join(path, "saved_model.pb"), "w") as f:
            f.write("fake")


def _fake_writes(monkeypatch):
    from keras_progdist.export import serving_graph

    monkeypatch.setattr(serving_graph, "build_archive", lambda *args, **kwargs: _FakeArchive())
    monkeypatch.setattr(export_stages, "_write_keras", lambda *args, **kwargs: "skipped")


def _fake_version(path, metadata):
    """A complete version folder as another exporter would leave it (`metadata`: its
    metadata, or just a weights sha256)."""
    if isinstance(metadata, str):
        metadata = {"weights_sha256": metadata}
    _FakeArchive().write_out(path)
    os.makedirs(os.path.dirname(os.path.join(path, export.METADATA_FILE)), exist_ok=True)
    with open(os.path.join(path, export.METADATA_FILE), "w") as f:
        json.dump(metadata, f)


def test_rerunning_the_finished_job_exports_nothing(exported, capsys):
    before = _snapshot(exported["export_dir"])
    _parse_gin()
    try:  # the main job's export again: today's code refused with ExportExistsError
        training.run(exported["workdir"], "export", export_dir=exported["export_dir"],
                     experiment_name=NAME, verbose=0)
    finally:
        gin.clear_config()
    result = export.export_workdir(exported["workdir"], exported["export_dir"], NAME)
    assert result["up_to_date"]
    assert [(r["version"], r["status"], r["keras_status"]) for r in result["stages"]] == \
        [(1, "up to date", "up to date")] * len(exported["steps"])
    assert _snapshot(exported["export_dir"]) == before  # no new version, no rewrite
    assert capsys.readouterr().out.count("is up to date") == 2 * len(exported["steps"])


def test_versions_follow_the_weights(tmp_path):
    export_dir = str(tmp_path)
    a, b = _small_model(0), _small_model(1)
    paths = export.stage_paths(export_dir, "v", 2)
    first = export.export_stage(a, export_dir, "v")
    assert (first["version"], first["status"], first["keras_status"]) == \
        (1, "exported", "exported")

    before = _snapshot(export_dir)
    again = export.export_stage(a, export_dir, "v")  # same weights: nothing written
    assert (again["version"], again["status"], again["keras_status"]) == \
        (1, "up to date", "up to date")
    assert _snapshot(export_dir) == before

    second = export.export_stage(b, export_dir, "v")  # other weights: the next number
    assert (second["version"], second["status"]) == (2, "exported")
    assert second["weights_sha256"] != first["weights_sha256"]
    assert export.existing_versions(paths["base_path"]) == [1, 2]
    v1 = os.path.join(paths["base_path"], "1")
    assert {k: v for k, v in _snapshot(export_dir).items() if k.startswith("v/v-2steps/1/")} \
        == {k: v for k, v in before.items() if k.startswith("v/v-2steps/1/")}
    assert export.read_version_metadata(v1)["weights_sha256"] == first["weights_sha256"]
    with open(paths["keras_metadata"]) as f:
        keras_meta = json.load(f)  # the .keras follows the newest version
    assert (keras_meta["version"], keras_meta["weights_sha256"]) == \
        (2, second["weights_sha256"])
    assert export.stage_paths(export_dir, "v", 2)["saved_model"] == second["saved_model"]

    v2_pb = os.path.join(second["saved_model"], "saved_model.pb")
    mtime = os.stat(v2_pb).st_mtime_ns
    replaced = export.export_stage(b, export_dir, "v", overwrite=True)
    assert (replaced["version"], replaced["status"], replaced["keras_status"]) == \
        (2, "replaced", "exported")
    assert os.stat(v2_pb).st_mtime_ns > mtime
    assert sorted(os.listdir(paths["base_path"])) == ["1", "2"]  # no temporary left

    # An explicit version: up to date with these weights, refused with others, and a
    # refused export_stages writes nothing.
    assert export.export_stage(b, export_dir, "v", version=2)["status"] == "up to date"
    snapshot = _snapshot(export_dir)
    with pytest.raises(export.ExportExistsError, match="already holds version 1"):
        export.export_stages([("student", 2, b)], export_dir, "v", version=1)
    assert _snapshot(export_dir) == snapshot
    with pytest.raises(export.ExportError, match="positive integer"):
        export.export_stages([("student", 2, b)], export_dir, "v", version=0)
    with pytest.raises(export.ExportError, match="Export name"):
        export.export_stages([("student", 2, b)], export_dir, "a/b")

    # A version written before metadata existed holds unknown weights: never reused.
    os.remove(os.path.join(second["saved_model"], export.METADATA_FILE))
    third = export.export_stage(b, export_dir, "v")
    assert (third["version"], third["status"]) == (3, "exported")


def test_serving_limits_are_enforced_in_every_signature(exported):
    import tensorflow as tf

    paths = export.stage_paths(exported["export_dir"], NAME, exported["steps"][-1])
    # The defaults for a 2-step stage.
    limits = {"max_steps": 1024, "max_batch": 256, "max_cost": 8192}
    assert export.read_version_metadata(paths["saved_model"])["limits"] == limits
    with open(paths["keras_metadata"]) as f:
        assert json.load(f)["limits"] == limits
    loaded = tf.saved_model.load(paths["saved_model"])
    serve, generate = loaded.signatures["serving_default"], loaded.signatures["generate"]
    denoise = loaded.signatures["denoise"]
    noise = exported["noise"]

    _expect_refused(generate, r"steps must be <= max_steps=1024", noise=noise,
                    steps=np.int32(1025))
    start = time.perf_counter()  # refused before the first step, not after 10**9
    _expect_refused(generate, r"steps must be <= max_steps=1024", noise=noise,
                    steps=np.int32(10 ** 9))
    assert time.perf_counter() - start < 30
    too_many = np.zeros((257,) + noise.shape[1:], np.float32)
    _expect_refused(serve, "seed holds more than max_batch=256",
                    seed=np.arange(257, dtype=np.int32))
    _expect_refused(generate, "noise holds more than max_batch=256", noise=too_many,
                    steps=np.int32(1))
    _expect_refused(denoise, "z holds more than max_batch=256", z=too_many,
                    t=np.zeros(257, np.float32))
    _expect_refused(serve, "seed is empty", seed=np.zeros(0, np.int32))
    _expect_refused(generate, "noise is empty", noise=noise[:0], steps=np.int32(2))
    _expect_refused(denoise, "z is empty", z=noise[:0], t=np.zeros(0, np.float32))
    assert serve(seed=tf.range(256))["images"].shape[0] == 256  # at the limit it serves


def test_limits_are_set_at_export(tmp_path):
    import tensorflow as tf

    export_dir = str(tmp_path)
    model = _small_model(2)
    with pytest.raises(export.ExportError, match="max_steps=1 is below"):
        export.export_stages([("s", 2, model)], export_dir, "lim", max_steps=1)
    with pytest.raises(export.ExportError, match="max_batch must be"):
        export.export_stage(model, export_dir, "lim", max_batch=0)
    with pytest.raises(export.ExportError, match="Warm-up batch sizes"):
        export.export_stage(model, export_dir, "lim", max_batch=2, warmup_batch_sizes=(4,))
    assert not os.listdir(export_dir)

    record = export.export_stages([("s", 2, model)], export_dir, "lim", max_steps=6,
                                  max_batch=3)["stages"][0]
    assert record["limits"] == {"max_steps": 6, "max_batch": 3, "max_cost": 6 * (3 + 16)}
    metadata = export.read_version_metadata(record["saved_model"])
    assert metadata["limits"] == record["limits"]
    loaded = tf.saved_model.load(record["saved_model"])
    serve, generate = loaded.signatures["serving_default"], loaded.signatures["generate"]
    noise = np.zeros((3, 8, 8, 1), np.float32)
    assert generate(noise=tf.constant(noise), steps=tf.constant(6))["images"].shape[0] == 3
    _expect_refused(generate, "steps must be <= max_steps=6", noise=noise, steps=np.int32(7))
    _expect_refused(serve, "seed holds more than max_batch=3",
                    seed=np.arange(4, dtype=np.int32))
    # Other limits are another model to serve: a new version, not "up to date".
    other = {**metadata, "limits": {"max_steps": 6, "max_batch": 4, "max_cost": 120}}
    base = os.path.dirname(record["saved_model"])
    assert export_versions.plan_version(base, other, None, False) == {"version": 2, "action": "new"}
    assert export_versions.plan_version(base, metadata, None, False)["action"] == "up to date"


def test_a_version_claimed_meanwhile_goes_to_the_next_number(tmp_path, monkeypatch):
    _fake_writes(monkeypatch)
    export_dir = str(tmp_path)
    model = _small_model(3)
    base = export.stage_paths(export_dir, "race", 2)["base_path"]
    real_rename = export_versions._rename_noreplace
    claims = []

    def other_exporter_claims_first(sha):
        # Another process renames its version in between our plan and our rename.
        def rename(src, dst):
            if not claims:
                claims.append(dst)
                _fake_version(dst, sha)
            return real_rename(src, dst)
        return rename

    monkeypatch.setattr(export_versions, "_rename_noreplace", other_exporter_claims_first("c" * 64))
    record = export.export_stage(model, export_dir, "race")
    assert claims == [os.path.join(base, "1")]
    assert (record["version"], record["status"]) == (2, "exported")
    assert export.read_version_metadata(os.path.join(base, "1"))["weights_sha256"] == "c" * 64
    assert export.read_version_metadata(os.path.join(base, "2"))["weights_sha256"] == \
        record["weights_sha256"]
    assert sorted(os.listdir(base)) == ["1", "2"]  # our build folder went into 2

    # An explicit version that someone else takes meanwhile: a clear error, no litter.
    claims.clear()
    with pytest.raises(export.ExportExistsError, match="claimed version 5"):
        export.export_stage(model, export_dir, "race", version=5)
    assert sorted(os.listdir(base)) == ["1", "2", "5"]

    # The other exporter wrote these very weights (and settings): ours is up to date.
    claims.clear()
    other = _small_model(4)
    same = export.stage_metadata(other, "race", 2, export.serving_limits(2))
    monkeypatch.setattr(export_versions, "_rename_noreplace", other_exporter_claims_first(same))
    result = export.export_stage(other, export_dir, "race")
    assert claims == [os.path.join(base, "6")]
    assert (result["version"], result["status"]) == (6, "up to date")
    assert sorted(os.listdir(base)) == ["1", "2", "5", "6"]


RACE = textwrap.dedent(r"""
    import json, os, sys, time
    sys.path.insert(0, "tests")
    from test_export import _small_model
    from keras_progdist import export
    export_dir, seed, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    model = _small_model(seed)
    open(ready, "w").close()
    while not os.path.exists(go):  # both start exporting at the same moment
        time.sleep(0.005)
    try:
        r = export.export_stage(model, export_dir, "race")
        print("RESULT " + json.dumps([r["version"], r["status"], r["weights_sha256"]]))
    except export.ExportExistsError as e:
        print("RESULT " + json.dumps(["refused", str(e)]))
""")


@pytest.mark.slow
def test_two_processes_exporting_at_once_get_different_versions(tmp_path):
    export_dir, go = str(tmp_path / "out"), str(tmp_path / "go")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, export_dir, str(seed),
                               str(tmp_path / f"ready{seed}"), go], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (10, 11)]
    try:
        deadline = time.time() + 300
        while not all(os.path.exists(tmp_path / f"ready{s}") for s in (10, 11)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        open(go, "w").close()
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for (stdout, stderr), p in zip(outputs, procs):
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
        print(stdout)  # "claimed by another export meanwhile" when the renames collided
    exported_ = sorted(r for r in results if r[0] != "refused")
    assert exported_, results
    assert [r[0] for r in exported_] == list(range(1, len(exported_) + 1))
    assert len({r[2] for r in exported_}) == len(exported_)  # one version per weights
    base = export.stage_paths(export_dir, "race", 2)["base_path"]
    assert sorted(os.listdir(base)) == [str(r[0]) for r in exported_]  # nothing left over
    for version, _, sha in exported_:
        meta = export.read_version_metadata(os.path.join(base, str(version)))
        assert meta["weights_sha256"] == sha


def test_stale_temporaries_of_killed_exports_are_removed(tmp_path, monkeypatch):
    _fake_writes(monkeypatch)
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    live = subprocess.Popen(["sleep", "120"])
    try:
        root = tmp_path / "litter"
        base = root / "litter-2steps"
        stale = [base / f".version.tmp-{dead}-0a1b2c3d",
                 base / f".replaced-2.tmp-{dead}-0a1b2c3d",
                 root / f"litter-2steps.keras.tmp-{dead}.keras",
                 root / f"litter-2steps.keras.tmp-{dead}-0a1b2c3d.keras",
                 root / f"litter-2steps.keras.json.tmp-{dead}-0a1b2c3d",
                 root / f"models.config.tmp-{dead}"]
        kept = [base / f".version.tmp-{live.pid}-0a1b2c3d",
                root / f"litter-2steps.keras.tmp-{live.pid}-0a1b2c3d.keras"]
        for path in stale + kept:
            if path.name.startswith("."):
                _FakeArchive().write_out(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("partial")
        _fake_version(str(base / "2"), "2" * 64)
        # An overwrite killed between its renames: version 3 only exists moved aside.
        _fake_version(str(base / f".replaced-3.tmp-{dead}-0a1b2c3d"), "3" * 64)

        record = export.export_stages([("student", 2, _small_model(5))], str(tmp_path),
                                      "litter")["stages"][0]
        assert [p for p in stale if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
        assert export.read_version_metadata(str(base / "3"))["weights_sha256"] == "3" * 64
        assert record["version"] == 4
        assert sorted(os.listdir(base)) == sorted(["2", "3", "4"] + [p.name for p in kept
                                                                     if p.parent == base])
    finally:
        live.kill()
        live.wait()


def test_export_subprocess_runs_the_running_package(tmp_path, monkeypatch):
    # Another keras_progdist first on the child's path (the cwd of `python -m`, and
    # PYTHONPATH): the child must still import this one.
    decoy = tmp_path / "keras_progdist"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('decoy keras_progdist imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(export.ExportError) as info:
        subprocess_export.export_in_subprocess(missing, str(tmp_path / "out"), "n",
                                               export.ExportOptions())
    assert "decoy" not in str(info.value)
    assert f"Work directory {missing} does not exist" in str(info.value)
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "out")

    command, env = subprocess_export._subprocess_command("w", "e", "n",
                                                         export.ExportOptions())
    parent = os.path.dirname(os.path.dirname(os.path.abspath(keras_progdist.__file__)))
    assert subprocess_export.package_parent() == parent
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [parent, str(tmp_path)]
    assert command[:4] == [sys.executable, "-c", subprocess_export._BOOTSTRAP, parent]


def test_export_of_a_missing_workdir_creates_nothing(tmp_path):
    # (That an export of a run only reads it: test_jax_backend_exports_through_a_...,
    # whose subprocess runs `export_workdir`.)
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(export.ExportError, match="Work directory .* does not exist"):
        export.export_workdir(missing, str(tmp_path / "out2"), NAME)
    assert not os.path.exists(missing) and not os.path.exists(tmp_path / "out2")


def test_export_needs_no_training_data(exported, tmp_path):
    """`--mode=export` reads only the work directory: a run whose training data is gone
    (here `dataset.data_dir` names no folder) exports every finished stage."""
    missing = str(tmp_path / "data_moved_away")
    export_dir = str(tmp_path / "saved_models")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [os.path.join(ROOT, "gin", "fashion_mnist_cpu.gin")],
            [f"dataset.data_dir = '{missing}'"])
        training.run(exported["workdir"], "export", export_dir=export_dir,
                     experiment_name=NAME, verbose=0)
    finally:
        gin.clear_config()
    models = sorted(os.listdir(os.path.join(export_dir, NAME)))
    assert models == sorted([f"{NAME}-{n}steps" for n in exported["steps"]]
                            + [f"{NAME}-{n}steps.keras" for n in exported["steps"]]
                            + [f"{NAME}-{n}steps.keras.json" for n in exported["steps"]]
                            + ["models.config"])
    assert not os.path.exists(missing)


JAX_EXPORT = textwrap.dedent(r"""
    import json, sys
    import gin, keras
    assert keras.backend.backend() == "jax"
    import keras_progdist.training.config  # noqa: F401  registers `evaluate`
    from keras_progdist import training
    workdir, export_dir, bindings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    gin.parse_config_files_and_bindings(["gin/tiny.gin"], bindings)
    training.run(workdir, "export", export_dir=export_dir, experiment_name="tiny",
                 verbose=0)
    print("AGAIN")  # the same job again: every stage up to date, nothing written
    training.run(workdir, "export", export_dir=export_dir, experiment_name="tiny",
                 verbose=0)
""")


# A minute or more, yet not marked slow: it reuses the `exported` work directory, which
# the separate process of the slow tests would have to train again.
def test_jax_backend_exports_through_a_tensorflow_subprocess(exported):
    pytest.importorskip("jax")
    export_dir = str(exported["base"] / "saved_models_jax")
    before = _snapshot(exported["workdir"])
    stdout = _run_python(JAX_EXPORT, exported["workdir"], export_dir,
                         json.dumps(GIN_BINDINGS), backend="jax", timeout=600)
    # Export only reads the run: nothing in the work directory was written or touched.
    assert _snapshot(exported["workdir"]) == before
    assert "exporting through TensorFlow in a subprocess" in stdout
    first, again = stdout.split("AGAIN", 1)
    assert first.count("is up to date") == 0 and first.count("exported") >= \
        len(exported["steps"])
    assert again.count("is up to date") == len(exported["steps"])
    # (Other limits giving the next version is backend-independent metadata logic:
    # test_limits_are_set_at_export.)
    import tensorflow as tf

    steps = exported["steps"][-1]
    paths = export.stage_paths(export_dir, NAME, steps)
    assert paths["version"] == 1
    loaded = tf.saved_model.load(paths["saved_model"])
    images = loaded.signatures["generate"](noise=tf.constant(exported["noise"]),
                                           steps=tf.constant(steps))["images"].numpy()
    np.testing.assert_allclose(images, exported["references"][steps], atol=1e-4)
    assert os.path.exists(paths["keras"])
    assert os.path.exists(os.path.join(export_dir, NAME, "models.config"))


def test_the_package_imports_without_tensorflow_and_runs_as_a_module():
    pytest.importorskip("jax")
    code = ("import sys; sys.path.insert(0, 'tests/helpers'); import no_tensorflow; "
            "import keras_progdist.export as e; "
            "assert no_tensorflow.loaded_tensorflow_modules() == [], "
            "no_tensorflow.loaded_tensorflow_modules(); "
            "assert e.check_name('a') == 'a'; print('IMPORTED')")
    assert "IMPORTED" in _run_python(code, backend="jax")
    result = subprocess.run([sys.executable, "-m", "keras_progdist.export", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0 and "--workdir" in result.stdout, result.stderr[-3000:]


def test_non_finite_or_huge_noise_is_refused_in_the_graph_naming_the_input(tmp_path):
    # NaN, inf or 1e38 noise came back as NaN images with no error.
    import tensorflow as tf

    from keras_progdist.export.serving_graph import build_archive

    path = str(tmp_path / "saved_model")
    build_archive(_small_model(3)).write_out(path, verbose=False)
    loaded = tf.saved_model.load(path)
    generate, denoise = loaded.signatures["generate"], loaded.signatures["denoise"]
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    images = generate(noise=tf.constant(noise), steps=tf.constant(2))["images"].numpy()
    assert np.isfinite(images).all()
    for bad in (np.nan, np.inf, -np.inf, 1e38, -2e4):
        poisoned = noise.copy()
        poisoned[1, 3, 4, 0] = bad
        _expect_refused(generate, r"noise must be finite with every \|value\| <= 10000",
                        noise=poisoned, steps=np.int32(2))
        _expect_refused(denoise, r"z must be finite with every \|value\| <= 10000",
                        z=poisoned, t=np.array([0.5, 0.5], np.float32))
    scaled = generate(noise=tf.constant(noise * 3), steps=tf.constant(2))["images"]
    assert np.isfinite(scaled.numpy()).all()  # deliberately scaled noise still serves


def test_default_limits_bound_the_cost_of_one_request(tmp_path):
    # generate(steps=1024, batch=256) was allowed by the defaults and took 376 s on
    # the tiny teacher; the defaults now bound a request's cost, steps x (batch + 16),
    # at 8192 (worst case 21.5 s there: benchmarks/results/serving_worst_case.json).
    import tensorflow as tf

    from keras_progdist.export.serving_graph import build_archive

    assert export.serving_limits(128) == {"max_steps": 1024, "max_batch": 256,
                                          "max_cost": 8192}
    # A stage whose own warm-up costs more still serves it.
    assert export.serving_limits(32768)["max_cost"] == 32768 * 17
    # Limits given at export are the caller's choice: no cost bound beyond them.
    assert export.serving_limits(2, max_batch=512)["max_cost"] == 1024 * (512 + 16)
    assert export.serving_limits(2, max_cost=100)["max_cost"] == 100
    with pytest.raises(export.ExportError, match="max_cost=100 is below the cost 2176"):
        export.serving_limits(128, max_cost=100)
    with pytest.raises(export.ExportError, match="max_cost must be"):
        export.serving_limits(2, max_cost=0)

    path = str(tmp_path / "saved_model")
    build_archive(_small_model(4, num_steps=128)).write_out(path, verbose=False)
    loaded = tf.saved_model.load(path)
    serve, generate = loaded.signatures["serving_default"], loaded.signatures["generate"]
    noise = np.zeros((256, 8, 8, 1), np.float32)
    start = time.perf_counter()  # each refused before its first step
    needle = r"steps x \({} batch \+ 16\) must be <= max_cost=8192"
    _expect_refused(generate, needle.format("noise"), noise=noise[:1],
                    steps=np.int32(482))  # 482 x 17 > 8192
    _expect_refused(generate, needle.format("noise"), noise=noise, steps=np.int32(31))
    _expect_refused(serve, needle.format("seed"), seed=np.arange(49, dtype=np.int32))
    assert time.perf_counter() - start < 30
    assert serve(seed=tf.constant([3]))["images"].shape == (1, 8, 8, 1)
    assert generate(noise=tf.constant(noise), steps=tf.constant(2))["images"].shape[0] \
        == 256
