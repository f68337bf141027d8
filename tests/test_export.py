"""Export for serving: TF Serving SavedModels and `.keras` files of every stage.

A real work directory is made once by the pipeline itself (teacher 4 steps -> student 2
steps on the embedded MNIST digits) and exported through `pipeline.run(mode="export")`.
Each SavedModel is then checked in a fresh Python process, as a server would load it:
every signature, determinism per seed, `generate` against the in-memory model's DDIM,
a DDIM loop written here over the `denoise` signature, the warm-up records, the `.keras`
file, and bad requests.
"""

import json
import os
import subprocess
import sys
import textwrap

import gin
import keras
import numpy as np
import pytest

from keras_progdist import export, pipeline
from keras_progdist.diffusion import DiffusionModel
from keras_progdist.networks.unet import UNet

pytestmark = pytest.mark.tensorflow_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_BINDINGS = [
    "teacher.train_steps=10", "teacher.checkpoint_every=10", "teacher.jit_compile=False",
    "distill.teacher_steps=4", "distill.min_steps=2", "distill.updates_per_stage=10",
    "distill.checkpoint_every=10", "distill.jit_compile=False", "UNet.channels=8",
]
NAME = "tiny"
NOISE_SEED = 7


def _parse_gin():
    try:  # tiny.gin configures `evaluate`, registered by the evaluation report module.
        import keras_progdist.evaluation.report  # noqa: F401
    except ImportError:
        pass
    gin.parse_config_files_and_bindings([os.path.join(ROOT, "gin", "tiny.gin")],
                                        GIN_BINDINGS)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A trained work directory, its export, and the in-memory models' DDIM samples."""
    base = tmp_path_factory.mktemp("export")
    workdir, export_dir = str(base / "workdir"), str(base / "saved_models")
    _parse_gin()
    try:
        pipeline.run(workdir, "train_teacher", verbose=0)
        pipeline.run(workdir, "distill", verbose=0)
        experiment = pipeline.run(workdir, "export", export_dir=export_dir,
                                  experiment_name=NAME, verbose=0)
        stages = experiment.stage_models()
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
        names + [f"{n}.keras" for n in names] + ["models.config"])
    for n in names:
        assert os.listdir(os.path.join(root, n)) == ["1"]
        version = os.path.join(root, n, "1")
        assert os.path.exists(os.path.join(version, "saved_model.pb"))
        assert os.path.exists(os.path.join(version, "variables", "variables.index"))
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


def test_export_refuses_an_existing_version_unless_overwrite(exported):
    stages = export.load_workdir_stages(exported["workdir"])
    assert [n for _, n, _ in stages] == exported["steps"]
    smallest = [stages[-1]]
    target = export.stage_paths(exported["export_dir"], NAME, exported["steps"][-1])
    before = os.path.getmtime(os.path.join(target["saved_model"], "saved_model.pb"))
    with pytest.raises(export.ExportExistsError, match="overwrite=True"):
        export.export_workdir(exported["workdir"], exported["export_dir"], NAME)
    with pytest.raises(export.ExportExistsError, match="already holds version 1"):
        export.export_stage(smallest[0][2], exported["export_dir"], NAME)
    assert os.path.getmtime(os.path.join(target["saved_model"], "saved_model.pb")) == before

    result = export.export_stages(smallest, exported["export_dir"], NAME, overwrite=True)
    assert result["stages"][0]["saved_model"] == target["saved_model"]
    assert os.path.getmtime(os.path.join(target["saved_model"], "saved_model.pb")) > before
    assert sorted(os.listdir(target["base_path"])) == ["1"]  # no temporary folder left
    with pytest.raises(export.ExportError, match="positive integer"):
        export.export_stages(smallest, exported["export_dir"], NAME, version=0)
    with pytest.raises(export.ExportError, match="Export name"):
        export.export_stages(smallest, exported["export_dir"], "a/b")


JAX_EXPORT = textwrap.dedent(r"""
    import json, sys
    import gin, keras
    assert keras.backend.backend() == "jax"
    import keras_progdist.evaluation.report  # noqa: F401  registers `evaluate`
    from keras_progdist import export, pipeline
    workdir, export_dir, bindings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    gin.parse_config_files_and_bindings(["gin/tiny.gin"], bindings)
    pipeline.run(workdir, "export", export_dir=export_dir, experiment_name="tiny",
                 verbose=0)
    try:
        pipeline.run(workdir, "export", export_dir=export_dir, experiment_name="tiny",
                     verbose=0)
        print("REFUSED none")
    except export.ExportExistsError as e:
        print("REFUSED", type(e).__name__)
""")


@pytest.mark.slow
def test_jax_backend_exports_through_a_tensorflow_subprocess(exported):
    pytest.importorskip("jax")
    export_dir = str(exported["base"] / "saved_models_jax")
    stdout = _run_python(JAX_EXPORT, exported["workdir"], export_dir,
                         json.dumps(GIN_BINDINGS), backend="jax", timeout=600)
    assert "exporting through TensorFlow in a subprocess" in stdout
    assert "REFUSED ExportExistsError" in stdout
    import tensorflow as tf

    steps = exported["steps"][-1]
    paths = export.stage_paths(export_dir, NAME, steps)
    loaded = tf.saved_model.load(paths["saved_model"])
    images = loaded.signatures["generate"](noise=tf.constant(exported["noise"]),
                                           steps=tf.constant(steps))["images"].numpy()
    np.testing.assert_allclose(images, exported["references"][steps], atol=1e-4)
    assert os.path.exists(paths["keras"])
    assert os.path.exists(os.path.join(export_dir, NAME, "models.config"))
