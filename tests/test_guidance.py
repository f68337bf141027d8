"""Classifier-free guidance and guided progressive distillation (Meng et al., CVPR 2023).

Convention: `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`, so `w = 0` is the
conditional model. Runs on TensorFlow and on JAX (`KERAS_BACKEND=jax`).

Where two computations differ only in batch layout (one call on `[z; z]` against two
calls on `z`), float32 kernels may round differently per batch size (measured: up to
~2e-6 on values of order 1); those comparisons allow 1e-5.
"""

import io
import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

from keras_progdist import data, parameterizations
from keras_progdist.diffusion import DiffusionModel, guided_denoise, network_denoise
from keras_progdist.networks import UNet
from keras_progdist.optimizers import make_optimizer
from keras_progdist.schedules import Schedule

SCHEDULE = Schedule("cosine")
SHAPE = (8, 8, 1)
CLASSES = 10  # the digits' classes
NET = dict(channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
           num_groups=4, num_classes=CLASSES)
ROUND_OFF = dict(rtol=1e-5, atol=1e-5)
PARAMETERIZATIONS = ["x", "v", "eps", "both"]


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _randomize(net, seed=0, scale=0.1):
    """Random weights everywhere (the output conv starts at zero, which would make
    every prediction, conditional or not, the same)."""
    rng = np.random.default_rng(seed)
    net.set_weights([w + scale * rng.standard_normal(w.shape).astype(w.dtype)
                     for w in net.get_weights()])
    return net


def _guided_net(parameterization="v", seed=0, **kw):
    out = 2 if parameterization == "both" else 1
    return _randomize(UNet(SHAPE, null_class=True, output_channels=out, **{**NET, **kw}),
                      seed)


def _batch(n=4, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    # Away from t = 1, where the eps parameterization's x_hat ~ 1/alpha is huge.
    t = rng.uniform(0.05, 0.9, (n,)).astype(np.float32)
    label = rng.integers(0, CLASSES, (n,)).astype(np.int32)
    return z, t, label


# -- the guided denoiser -----------------------------------------------------------------
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_guidance_with_w_0_is_the_conditional_model(parameterization):
    net = _guided_net(parameterization)
    z, t, label = _batch()
    x_c, eps_c = network_denoise(net, z, t, SCHEDULE, parameterization, label)
    x_w, eps_w = network_denoise(net, z, t, SCHEDULE, parameterization, label,
                                 guidance=0.0)
    x_null, _ = network_denoise(net, z, t, SCHEDULE, parameterization,
                                np.full_like(label, CLASSES))
    # The null half really differs, so w = 0 selecting it would be caught.
    assert np.abs(_np(x_c) - _np(x_null)).max() > 1e-2
    np.testing.assert_allclose(_np(x_w), _np(x_c), **ROUND_OFF)
    np.testing.assert_allclose(_np(eps_w), _np(eps_c), **ROUND_OFF)


class _CallRecorder:
    """A network stand-in that records each call's batch size."""

    def __init__(self, network):
        self.network = network
        self.num_classes = network.num_classes
        self.null_class = network.null_class
        self.guidance_conditioned = False
        self.batches = []

    def __call__(self, inputs, training=False):
        self.batches.append(int(inputs[0].shape[0]))
        return self.network(inputs, training=training)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_one_guided_call_equals_two_calls_combined_by_the_formula(parameterization):
    net = _guided_net(parameterization, seed=2)
    z, t, label = _batch(seed=3)
    w = np.array([0.0, 0.5, 1.5, 4.0], np.float32)  # one strength per example
    recorder = _CallRecorder(net)
    x_w, eps_w = network_denoise(recorder, z, t, SCHEDULE, parameterization, label,
                                 guidance=w)
    assert recorder.batches == [2 * len(z)]  # one call, on the doubled batch

    logsnr = SCHEDULE.logsnr(t)
    null = np.full_like(label, CLASSES)
    out_c = net([z, t, label])
    out_u = net([z, t, null])
    x_c, eps_c, _ = parameterizations.predict(out_c, z, logsnr, parameterization)
    x_u, eps_u, _ = parameterizations.predict(out_u, z, logsnr, parameterization)
    w4 = w[:, None, None, None]
    expected_x = (1 + w4) * _np(x_c) - w4 * _np(x_u)
    alpha, sigma = (_np(v)[:, None, None, None] for v in SCHEDULE.alpha_sigma(t))
    if parameterization == "eps":
        expected_eps = (1 + w4) * _np(eps_c) - w4 * _np(eps_u)
    else:
        expected_eps = (z - alpha * expected_x) / sigma
    np.testing.assert_allclose(_np(x_w), expected_x, **ROUND_OFF)
    np.testing.assert_allclose(_np(eps_w), expected_eps, **ROUND_OFF)
    # z = alpha x_hat_w + sigma eps_hat_w holds for the guided pair too.
    np.testing.assert_allclose(alpha * _np(x_w) + sigma * _np(eps_w), z, **ROUND_OFF)
    # Guidance moved the prediction (w = 4 on the last example).
    assert np.abs(_np(x_w)[3] - _np(x_c)[3]).max() > 1e-2


def test_guided_clip_clips_x_hat_w_and_recomputes_eps_hat():
    net = _guided_net("x", seed=4)
    # Large weights make x_hat_w leave [-1, 1].
    _randomize(net, seed=5, scale=1.0)
    z, t, label = _batch(seed=6)
    x_w, _ = guided_denoise(net, z, t, label, 3.0, SCHEDULE, "x")
    assert np.abs(_np(x_w)).max() > 1.0
    x_c, eps_c = guided_denoise(net, z, t, label, 3.0, SCHEDULE, "x", clip=True)
    np.testing.assert_array_equal(_np(x_c), np.clip(_np(x_w), -1, 1))
    expected = _np(parameterizations.eps_from_x(x_c, z, SCHEDULE.logsnr(t)))
    np.testing.assert_array_equal(_np(eps_c), expected)


def test_guidance_needs_a_null_class_and_a_label():
    plain = _randomize(UNet(SHAPE, **NET))
    z, t, label = _batch()
    with pytest.raises(ValueError, match="null_class=True"):
        network_denoise(plain, z, t, SCHEDULE, "v", label, guidance=1.0)
    with pytest.raises(ValueError, match="needs a label"):
        network_denoise(_guided_net(), z, t, SCHEDULE, "v", None, guidance=1.0)


# -- the U-Net's null class ----------------------------------------------------------------
def test_null_class_adds_one_embedding_row_and_keeps_old_configs():
    plain = UNet(SHAPE, **NET)
    guided = UNet(SHAPE, null_class=True, **NET)
    assert plain.get_layer("class_embedding").embeddings.shape[0] == CLASSES
    assert guided.get_layer("class_embedding").embeddings.shape[0] == CLASSES + 1
    # A network without the flags writes the config it always wrote (what old .keras
    # files and workdir config.json files hold), and that config builds it again.
    assert not {"null_class", "guidance_conditioned"} & set(plain.get_config())
    assert UNet.from_config(plain.get_config()).get_config() == plain.get_config()
    assert UNet.from_config(guided.get_config()).null_class
    with pytest.raises(ValueError, match="null_class needs UNet.num_classes"):
        UNet(SHAPE, null_class=True, **{**NET, "num_classes": None})


# -- label dropout -------------------------------------------------------------------------
def test_label_dropout_trains_the_null_row_and_sampling_is_guided():
    keras.utils.set_random_seed(0)
    model = DiffusionModel(UNet(SHAPE, null_class=True, **NET), parameterization="v",
                           ema_decay=None, num_steps=2, label_dropout=0.5)
    model.compile(optimizer=make_optimizer(1e-3))
    table = model.network.get_layer("class_embedding").embeddings
    before = _np(table).copy()
    ds = data.make_dataset("mnist_embedded", batch_size=16, image_size=8, seed=0,
                           with_labels=True)
    model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    # Only dropped labels reach the null row: it received gradients.
    assert np.abs(_np(table)[CLASSES] - before[CLASSES]).max() > 1e-5

    label = np.array([0, 1, 7, 9], np.int32)
    plain = model.sample(batch_size=4, label=label, seed=0)
    at_0 = model.sample(batch_size=4, label=label, seed=0, guidance=0.0)
    guided = model.sample(batch_size=4, label=label, seed=0, guidance=3.0)
    per_image = model.sample(batch_size=4, label=label, seed=0,
                             guidance=[0.0, 3.0, 3.0, 0.0], sampler="ancestral")
    np.testing.assert_allclose(at_0, plain, **ROUND_OFF)
    # After 3 updates the conditional and null predictions are still close (measured
    # ~3e-4 apart after 2 guided steps), but far above the round-off of `at_0`.
    assert np.abs(guided - plain).max() > 100 * max(np.abs(at_0 - plain).max(), 1e-7)
    assert per_image.shape == (4,) + SHAPE
    with pytest.raises(ValueError, match="one per image"):
        model.sample(batch_size=4, label=label, guidance=[1.0, 2.0])
    with pytest.raises(ValueError, match="class-conditional: pass label"):
        DiffusionModel(UNet(SHAPE, null_class=True, **NET), ema_decay=None).sample(
            batch_size=1, guidance=1.0, label=None)


def test_drop_labels_drops_at_the_rate_to_the_null_class():
    from keras_progdist.diffusion import drop_labels

    label = np.arange(20000, dtype=np.int32) % CLASSES
    out = _np(drop_labels(label, 0.2, CLASSES, ops.convert_to_tensor([3, 4], "int32")))
    dropped = out == CLASSES
    assert abs(dropped.mean() - 0.2) < 0.015
    np.testing.assert_array_equal(out[~dropped], label[~dropped])
    np.testing.assert_array_equal(
        _np(drop_labels(label, 0.0, CLASSES, ops.convert_to_tensor([3, 4], "int32"))),
        label)


def test_label_dropout_needs_a_null_class_and_is_in_the_config(tmp_path):
    with pytest.raises(ValueError, match="null_class=True"):
        DiffusionModel(UNet(SHAPE, **NET), label_dropout=0.1)
    with pytest.raises(ValueError, match="label_dropout must be in"):
        DiffusionModel(UNet(SHAPE, null_class=True, **NET), label_dropout=1.0)
    with pytest.raises(ValueError, match="guidance needs a model trained for it"):
        DiffusionModel(UNet(SHAPE, **NET), ema_decay=None).sample(
            batch_size=1, label=[0], guidance=1.0)
    model = DiffusionModel(_guided_net(), ema_decay=None, label_dropout=0.15)
    assert DiffusionModel.from_config(model.get_config()).label_dropout == 0.15

    # A .keras file written before label_dropout existed (no such key) still loads.
    plain = DiffusionModel(_randomize(UNet(SHAPE, **NET)), ema_decay=None, num_steps=2)
    path = tmp_path / "old.keras"
    plain.save(str(path))
    _drop_config_key(path, "label_dropout")
    loaded = keras.saving.load_model(str(path), safe_mode=True)
    assert loaded.label_dropout == 0.0
    label = np.array([0, 2], np.int32)
    np.testing.assert_array_equal(loaded.sample(batch_size=2, label=label, seed=0),
                                  plain.sample(batch_size=2, label=label, seed=0))


def _drop_config_key(path, key):
    """Rewrites a .keras archive as the code before `key` existed wrote it."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    assert key in config["config"]
    del config["config"][key]
    files["config.json"] = json.dumps(config).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    path.write_bytes(buffer.getvalue())
