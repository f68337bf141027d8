"""`DiffusionModel` end to end on the real embedded MNIST digits (16x16): `fit` lowers
the loss, the EMA copy, resuming `fit`, `.keras` round trips of a trained model,
seeded sampling, and the failure paths. Runs on TensorFlow and on JAX
(`KERAS_BACKEND=jax`).

One module-scoped model is trained once (two `fit` calls) and shared, because every
new model's train step and sampler are XLA-compiled again.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_progdist import parameterizations
from keras_progdist.data import make_dataset
from keras_progdist.diffusion import DiffusionModel, copy_weights, diffuse
from keras_progdist.networks import UNet
from keras_progdist.optimizers import make_optimizer

SHAPE = (16, 16, 1)
# num_groups=8 keeps >= 2 channels per GroupNorm group: with one channel per group the
# ResBlock's time embedding is normalized away (see test_unet.py).
NET = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
           num_groups=8)
EPOCHS, STEPS = 8, 10  # 80 steps, loss reported per 10-step chunk
STEPS_2 = 10


def _net(**kw):
    return UNet(SHAPE, **{**NET, **kw})


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


class _Recorder(keras.callbacks.Callback):
    """Raw network weights at the start of `fit` and after its last batch."""

    def on_train_begin(self, logs=None):
        self.at_begin = _weights(self.model.network)

    def on_train_batch_end(self, batch, logs=None):
        self.after_last_batch = _weights(self.model.network)


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = DiffusionModel(_net(), parameterization="v", weighting="snr_trunc",
                           ema_decay=0.999, num_steps=8, seed=0)
    model.compile(optimizer=make_optimizer(1e-3))
    ema_at_init = _weights(model.ema_network)
    raw_at_init = _weights(model.network)
    ds = make_dataset("mnist_embedded", batch_size=32, image_size=16, seed=0)
    first = _Recorder()
    history = model.fit(ds, epochs=EPOCHS, steps_per_epoch=STEPS, verbose=0,
                        callbacks=[first])
    after_first = dict(raw=_weights(model.network), ema=_weights(model.ema_network),
                       iterations=int(model.optimizer.iterations))
    second = _Recorder()
    history_2 = model.fit(ds, epochs=1, steps_per_epoch=STEPS_2, verbose=0,
                          callbacks=[second])
    return dict(model=model, losses=history.history["loss"], losses_2=history_2.history["loss"],
                first=first, second=second, after_first=after_first,
                ema_at_init=ema_at_init, raw_at_init=raw_at_init)


def test_fit_on_embedded_mnist_lowers_the_loss(trained):
    losses = trained["losses"]
    print(f"{keras.backend.backend()}: loss per {STEPS}-step chunk:",
          [round(v, 4) for v in losses])
    assert all(np.isfinite(losses))
    # Measured (TF): 0.60 -> 0.24; JAX is similar. Ask for a 30% drop.
    assert losses[-1] < 0.7 * losses[0], losses


def test_ema_equals_raw_network_at_init():
    model = DiffusionModel(_net(), ema_decay=0.9999)
    raw, ema = _weights(model.network), _weights(model.ema_network)
    assert len(raw) == len(ema) > 0
    assert _max_diff(raw, ema) == 0.0
    # Separate variables, not aliases of one buffer.
    assert all(a is not b for a, b in zip(model.network.weights, model.ema_network.weights))
    assert not model.ema_network.trainable and model.sampling_network is model.ema_network


def test_ema_network_differs_from_raw_after_training_and_lags_behind(trained):
    raw, ema = trained["after_first"]["raw"], trained["after_first"]["ema"]
    assert _max_diff(raw, ema) > 1e-3
    # The EMA moved away from the init too, but (decay ~0.9) not as far as the raw net.
    init = trained["raw_at_init"]
    moved_raw = sum(float(np.abs(r - i).sum()) for r, i in zip(raw, init))
    moved_ema = sum(float(np.abs(e - i).sum()) for e, i in zip(ema, init))
    assert 0.0 < moved_ema < moved_raw, (moved_ema, moved_raw)
    assert _max_diff(trained["ema_at_init"], init) == 0.0


def test_fit_leaves_the_raw_weights_in_place(trained):
    # Keras' Adam(use_ema=True) would overwrite them with the EMA at the end of fit().
    rec, after = trained["first"], trained["after_first"]
    assert _max_diff(rec.after_last_batch, after["raw"]) == 0.0
    assert _max_diff(after["raw"], after["ema"]) > 1e-3


def test_second_fit_continues_from_raw_not_ema_weights(trained):
    after, second = trained["after_first"], trained["second"]
    assert _max_diff(second.at_begin, after["raw"]) == 0.0
    assert after["iterations"] == EPOCHS * STEPS
    assert int(trained["model"].optimizer.iterations) == EPOCHS * STEPS + STEPS_2
    # It trains on: the weights move, and the loss starts where the first fit ended.
    assert _max_diff(second.after_last_batch, after["raw"]) > 0.0
    print("second fit loss:", trained["losses_2"], "first fit, first/last chunk:",
          trained["losses"][0], trained["losses"][-1])
    assert trained["losses_2"][0] < 0.8 * trained["losses"][0]


def test_sample_is_reproducible_for_a_seed(trained):
    model = trained["model"]
    a = model.sample(batch_size=4, num_steps=8, seed=1)
    b = model.sample(batch_size=4, num_steps=8, seed=1)
    c = model.sample(batch_size=4, num_steps=8, seed=2)
    assert a.shape == (4,) + SHAPE and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-2
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_saved_and_loaded_trained_model_gives_identical_samples(trained, tmp_path):
    model = trained["model"]
    path = str(tmp_path / "teacher.keras")
    keras.saving.save_model(model, path)
    loaded = keras.saving.load_model(path)  # safe_mode on, no custom_objects
    assert isinstance(loaded, DiffusionModel)
    assert loaded.get_config() == model.get_config()
    assert _max_diff(_weights(loaded.network), _weights(model.network)) == 0.0
    assert _max_diff(_weights(loaded.ema_network), _weights(model.ema_network)) == 0.0
    # The optimizer comes back with its state (step count, Adam moments).
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    opt_a = [np.array(v) for v in model.optimizer.variables]
    opt_b = [np.array(v) for v in loaded.optimizer.variables]
    assert len(opt_a) == len(opt_b) and _max_diff(opt_a, opt_b) == 0.0
    np.testing.assert_array_equal(loaded.sample(batch_size=4, num_steps=8, seed=5),
                                  model.sample(batch_size=4, num_steps=8, seed=5))


def test_loaded_model_resumes_the_training_noise_stream(trained, tmp_path):
    # Resuming from a .keras checkpoint must not replay the (t, eps) draws of step 0.
    # The stream comes from `seed_generator`, whose state Keras does not save as a
    # weight: after loading it is back at its initial value.
    model = trained["model"]
    path = str(tmp_path / "resume.keras")
    keras.saving.save_model(model, path)
    loaded = keras.saving.load_model(path)
    state = np.array(model.seed_generator.state)
    assert state[1] == EPOCHS * STEPS + STEPS_2  # one draw per step so far
    np.testing.assert_array_equal(np.array(loaded.seed_generator.state), state)


def test_denoise_uses_ema_by_default_and_raw_on_request(trained):
    model = trained["model"]
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2,) + SHAPE).astype(np.float32)
    t = np.array([0.3, 0.7], np.float32)
    ema = ops.convert_to_numpy(model.denoise(z, t)[0])
    raw = ops.convert_to_numpy(model.denoise(z, t, use_ema=False)[0])
    # By hand: the v parameterization, x_hat = alpha z - sigma v_out, on the EMA network.
    v_out = ops.convert_to_numpy(model.ema_network([z, t]))
    logsnr = ops.convert_to_numpy(model.schedule.logsnr(t))
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None]
    np.testing.assert_allclose(ema, alpha * z - sigma * v_out, atol=1e-5)
    assert np.abs(ema - raw).max() > 1e-4


def _alpha_sigma_np(model, t):
    logsnr = ops.convert_to_numpy(model.schedule.logsnr(t))
    return (np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None],
            np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None])


@pytest.mark.parametrize("parameterization", ["v", "eps"])
def test_denoise_clip_clips_x_hat_and_recomputes_eps_hat(parameterization):
    model = DiffusionModel(_net(), parameterization=parameterization, ema_decay=None)
    conv = model.network.get_layer("conv_out")
    conv.kernel.assign(np.random.RandomState(0).normal(0, 0.3, conv.kernel.shape))
    # Large z at low noise: x_hat ~ z / alpha leaves [-1, 1] for many pixels.
    z = 3.0 * np.random.default_rng(1).standard_normal((2,) + SHAPE).astype(np.float32)
    t = np.array([0.2, 0.6], np.float32)
    x_raw, eps_raw = (ops.convert_to_numpy(a) for a in model.denoise(z, t))
    x_clip, eps_clip = (ops.convert_to_numpy(a) for a in model.denoise(z, t, clip=True))
    assert np.abs(x_raw).max() > 1.5  # the case is non-trivial
    np.testing.assert_allclose(x_clip, np.clip(x_raw, -1.0, 1.0), atol=1e-6)
    # eps_hat = (z - alpha x_hat) / sigma with the clipped x_hat, so that
    # z = alpha x_hat + sigma eps_hat still holds (a consistent DDIM step).
    alpha, sigma = _alpha_sigma_np(model, t)
    np.testing.assert_allclose(eps_clip, (z - alpha * x_clip) / sigma, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(alpha * x_clip + sigma * eps_clip, z, atol=1e-4)
    assert np.abs(eps_clip - eps_raw).max() > 1e-2
    # The same numbers as parameterizations.predict(clip_x=True) on the raw output.
    output = model.network([z, t])
    want = parameterizations.predict(output, z, model.schedule.logsnr(t), parameterization,
                                     clip_x=True)
    np.testing.assert_allclose(x_clip, ops.convert_to_numpy(want[0]), atol=1e-6)
    np.testing.assert_allclose(eps_clip, ops.convert_to_numpy(want[1]), atol=1e-5)


def _bounded(**kw):
    return DiffusionModel(_net(), ema_decay=None, **{"num_steps": 2, **kw})


def test_sample_above_max_steps_is_refused_before_any_work():
    model = _bounded(max_steps=8, max_batch=4)
    with pytest.raises(ValueError, match=r"num_steps=9 .*max_steps=8"):
        model.sample(batch_size=1, num_steps=9)
    # Refused before compiling: a step count the server must never run.
    with pytest.raises(ValueError, match=r"num_steps=1000000000 .*max_steps=8"):
        model.sample(batch_size=1, num_steps=10**9)
    assert model._compiled_samplers == {}


@pytest.mark.parametrize("kwargs,match", [
    # 1e9 images of 16x16 would be 1 TB of noise: refused before any is drawn.
    (dict(batch_size=10**9), r"batch of 1000000000 images .*max_batch=4"),
    (dict(batch_size=5), r"batch of 5 images .*max_batch=4"),
    (dict(noise=np.zeros((5,) + SHAPE, np.float32)), r"batch of 5 images .*max_batch=4"),
    (dict(batch_size=0), r"batch of 0"),
    (dict(noise=np.zeros((0,) + SHAPE, np.float32)), r"batch of 0"),
])
def test_sample_batch_outside_1_to_max_batch_is_refused_before_any_work(kwargs, match,
                                                                        monkeypatch):
    model = _bounded(max_steps=8, max_batch=4)

    def no_noise(*args, **kw):
        raise AssertionError("noise was drawn before the batch was checked")

    monkeypatch.setattr(keras.random, "normal", no_noise)
    with pytest.raises(ValueError, match=match):
        model.sample(**kwargs)
    assert model._compiled_samplers == {}


def test_empty_batch_is_refused_without_max_batch():
    with pytest.raises(ValueError, match=r"batch of 0"):
        _bounded().sample(batch_size=0)


def test_sample_at_the_limits_runs():
    model = _bounded(max_steps=3, max_batch=2)
    out = model.sample(batch_size=2, num_steps=3, seed=0)
    assert out.shape == (2,) + SHAPE and np.all(np.isfinite(out))


def test_limits_are_saved_in_the_config_and_old_configs_load_unbounded(tmp_path):
    model = _bounded(max_steps=8, max_batch=4)
    config = model.get_config()
    assert config["max_steps"] == 8 and config["max_batch"] == 4
    restored = DiffusionModel.from_config(config)
    assert (restored.max_steps, restored.max_batch) == (8, 4)
    path = str(tmp_path / "bounded.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert (loaded.max_steps, loaded.max_batch) == (8, 4)
    with pytest.raises(ValueError, match="max_steps=8"):
        loaded.sample(batch_size=1, num_steps=9)
    # A config written before the limits existed: no keys, no limits.
    old = {k: v for k, v in config.items() if k not in ("max_steps", "max_batch")}
    unbounded = DiffusionModel.from_config(old)
    assert unbounded.max_steps is None and unbounded.max_batch is None
    assert unbounded.get_config()["max_steps"] is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_steps=0), "max_steps must be None or an int >= 1, got 0"),
    (dict(max_batch=-1), "max_batch must be None or an int >= 1, got -1"),
    (dict(max_batch=2.5), "max_batch must be None or an int >= 1, got 2.5"),
    (dict(num_steps=16, max_steps=8), "num_steps=16 is above max_steps=8"),
])
def test_bad_limits_are_errors_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _bounded(**kwargs)


def test_diffuse_is_alpha_x_plus_sigma_eps():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3,) + SHAPE).astype(np.float32)
    eps = rng.standard_normal((3,) + SHAPE).astype(np.float32)
    logsnr = np.array([-3.0, 0.0, 5.0], np.float32)
    alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None]
    sigma = np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None]
    np.testing.assert_allclose(ops.convert_to_numpy(diffuse(x, eps, logsnr)),
                               alpha * x + sigma * eps, atol=1e-6)


def test_copy_weights_copies_values_into_separate_buffers():
    a, b = _net(), _net()
    rng = np.random.default_rng(0)
    a.set_weights([w + rng.standard_normal(w.shape).astype(w.dtype) for w in a.get_weights()])
    copy_weights(a, b)
    assert _max_diff(_weights(a), _weights(b)) == 0.0
    b.weights[0].assign(b.weights[0] + 1.0)
    np.testing.assert_allclose(_weights(b)[0] - _weights(a)[0], 1.0, atol=1e-5)


@pytest.mark.parametrize("parameterization,out_ch", [("both", 1), ("v", 2), ("x", 2)])
def test_parameterization_output_channel_mismatch_is_an_error(parameterization, out_ch):
    net = _net(output_channels=out_ch)
    expected = 2 if parameterization == "both" else 1
    with pytest.raises(ValueError) as info:
        DiffusionModel(net, parameterization=parameterization)
    msg = str(info.value)
    assert f"'{parameterization}'" in msg
    assert f"{expected} output channels" in msg and f"has {out_ch}" in msg


def test_both_parameterization_accepts_doubled_output_channels():
    model = DiffusionModel(_net(output_channels=2), parameterization="both", ema_decay=None)
    assert model.ema_network is None and model.sampling_network is model.network


@pytest.mark.parametrize("kwargs,match", [
    (dict(parameterization="score"), "'score'"),
    (dict(weighting="lambda"), "'lambda'"),
    (dict(schedule="sigmoid"), "'sigmoid'"),
    (dict(num_steps=0), "num_steps must be >= 1, got 0"),
])
def test_bad_model_arguments_are_errors_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionModel(_net(), **kwargs)


def test_bad_sample_arguments_are_errors(trained):
    model = trained["model"]
    with pytest.raises(ValueError, match="'euler'"):
        model.sample(batch_size=1, sampler="euler")
    with pytest.raises(ValueError, match="noise or batch_size"):
        model.sample()
    with pytest.raises(ValueError, match=r"\[B, 16, 16, 1\]"):
        model.sample(noise=np.zeros((1, 8, 8, 1), np.float32))


def test_class_conditional_model_trains_on_labels_and_needs_them():
    keras.utils.set_random_seed(1)
    model = DiffusionModel(_net(num_classes=10), parameterization="x", ema_decay=None,
                           num_steps=4)
    model.compile(optimizer=make_optimizer(1e-3))
    embedding_before = np.array(model.network.get_layer("class_embedding").embeddings)
    labelled = make_dataset("mnist_embedded", batch_size=32, image_size=16, seed=0,
                            with_labels=True)
    history = model.fit(labelled, epochs=1, steps_per_epoch=3, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    embedding_after = np.array(model.network.get_layer("class_embedding").embeddings)
    # The labels reach the loss: the class embedding received gradients.
    assert np.abs(embedding_after - embedding_before).max() > 1e-5

    samples = model.sample(batch_size=3, label=np.array([0, 1, 2], np.int32), seed=0,
                           num_steps=2)
    assert samples.shape == (3,) + SHAPE
    with pytest.raises(ValueError, match="class-conditional: pass label"):
        model.sample(batch_size=3, seed=0)
    unlabelled = make_dataset("mnist_embedded", batch_size=32, image_size=16, seed=0)
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=10\).*label"):
        model.fit(unlabelled, epochs=1, steps_per_epoch=1, verbose=0)


@pytest.mark.tensorflow_only
def test_sampling_many_models_does_not_warn_about_retracing():
    """Each model compiles its own sampler by design; TensorFlow's retracing warning
    about it is only noise in a run's log (7 models used to print 8 warnings)."""
    import io
    import logging

    import tensorflow as tf

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    tf.get_logger().addHandler(handler)
    try:
        for _ in range(7):
            model = DiffusionModel(
                UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                     attention_resolutions=(), num_groups=4), ema_decay=None, num_steps=2)
            model.sample(batch_size=2, seed=0)
    finally:
        tf.get_logger().removeHandler(handler)
    assert "retracing" not in stream.getvalue()
