"""Classifier-free guidance and guided progressive distillation (Meng et al., CVPR 2023).

Convention: `x_hat_w = (1 + w) x_hat(z, c) - w x_hat(z, null)`, so `w = 0` is the
conditional model. Runs on TensorFlow and on JAX (`KERAS_BACKEND=jax`).

Where two computations differ only in batch layout (one call on `[z; z]` against two
calls on `z`), float32 kernels may round differently per batch size (measured: up to
~2e-6 on values of order 1); those comparisons allow 1e-5.
"""

import io
import json
import warnings
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


def test_evaluation_samples_are_guided_at_the_strength_asked():
    """`samples.generate_range(..., guidance=w)` (what the guided benchmark scores) is
    `sample(noise, label, guidance=w)` on the evaluation's noise and labels."""
    from keras_progdist.evaluation import samples

    model = DiffusionModel(_guided_net("v", seed=3), parameterization="v", ema_decay=None,
                           num_steps=2)
    noise = keras.random.normal((6,) + SHAPE, seed=9)  # batch 0 of a run of 6, seed 9
    label = samples.labels_for(0, 6, CLASSES)
    got = {w: samples.generate_range(model, 2, 0, 6, 6, 6, 9, CLASSES, guidance=w)
           for w in (None, 0.0, 2.0)}
    np.testing.assert_allclose(got[2.0], _np(model.sample(noise=noise, num_steps=2,
                                                          label=label, guidance=2.0)),
                               **ROUND_OFF)
    np.testing.assert_allclose(got[0.0], got[None], **ROUND_OFF)
    assert np.abs(got[2.0] - got[0.0]).max() > 1e-3


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


# -- stage one: the w-conditioned student --------------------------------------------------
class _GuidedTeacherNetwork(keras.Model):
    """A guidance-conditioned "network" computing the guided teacher's function: its
    output is the one that makes `predict` return exactly `(x_hat_w, eps_hat_w)`
    (`parameterizations.target`; for `x`, `x_hat_w` itself)."""

    guidance_conditioned = True

    def __init__(self, teacher, parameterization):
        super().__init__()
        self.teacher = teacher
        self.parameterization = parameterization
        self.num_classes = teacher.num_classes

    def call(self, inputs, training=False):
        z, t, label, w = inputs
        x_hat_w, eps_hat_w = guided_denoise(self.teacher, z, t, label, w, SCHEDULE,
                                            self.parameterization)
        return parameterizations.target(x_hat_w, eps_hat_w, SCHEDULE.logsnr(t),
                                        self.parameterization)


def _labelled(batch=8):
    return data.make_dataset("mnist_embedded", batch_size=batch, image_size=8, seed=0,
                             with_labels=True)


def _first_batch(batch=8):
    images, labels = next(iter(_labelled(batch)))
    return np.asarray(images, np.float32), np.asarray(labels, np.int32)


@pytest.mark.parametrize("parameterization", ["x", "v"])
def test_stage_one_loss_is_zero_when_the_student_is_the_guided_teacher(parameterization):
    from keras_progdist.guided_distillation import GuidanceDistiller

    teacher = _guided_net(parameterization, seed=7)
    trainer = GuidanceDistiller(teacher, parameterization=parameterization, w_min=1.0,
                                w_max=4.0, seed=3)
    images, labels = _first_batch()
    # The student as built: the teacher's conditional model (its w embedding is 0),
    # which is not the guided one for w in [1, 4].
    assert float(trainer.compute_loss(x=images, y=labels)) > 1e-4
    trainer.student = _GuidedTeacherNetwork(trainer.teacher, parameterization)
    loss = float(trainer.compute_loss(x=images, y=labels))
    if parameterization == "x":
        assert loss == 0.0  # x_hat = the network output: the very same numbers
    else:
        assert loss < 1e-10  # v: x_hat = alpha z - sigma v_out, round-off only


def test_stage_one_student_starts_as_the_teachers_conditional_model():
    from keras_progdist.guided_distillation import GuidanceDistiller

    teacher = _guided_net("v", seed=8)
    trainer = GuidanceDistiller(teacher, parameterization="v")
    # Everything but the guidance embedding comes from the teacher.
    assert trainer.uninitialized and all(p.startswith("guidance_embedding/")
                                         for p in trainer.uninitialized)
    assert len(trainer.student.weights) == len(teacher.weights) + len(
        trainer.uninitialized)
    z, t, label = _batch(seed=9)
    expected = _np(teacher([z, t, label]))
    for w in (0.0, 2.5):
        np.testing.assert_array_equal(
            _np(trainer.student([z, t, label, np.full((4,), w, np.float32)])), expected)
    with pytest.raises(ValueError, match="null_class=True"):
        GuidanceDistiller(_randomize(UNet(SHAPE, **NET)))
    with pytest.raises(ValueError, match="w_min <= w_max"):
        GuidanceDistiller(teacher, w_min=2.0, w_max=1.0)


def test_stage_one_trains_exactly_the_students_weights():
    import warnings

    from keras_progdist.guided_distillation import GuidanceDistiller

    teacher_model = DiffusionModel(UNet(SHAPE, null_class=True, **NET),
                                   parameterization="v", ema_decay=0.99, label_dropout=0.1)
    _randomize(teacher_model.ema_network, seed=10)
    ema = teacher_model.sampling_network
    assert not ema.trainable  # an EMA network's config says trainable=False
    trainer = GuidanceDistiller(ema, parameterization="v", w_min=0.0, w_max=4.0, seed=1)
    student_ids = {id(v) for v in trainer.student.trainable_variables}
    assert len(student_ids) == len(trainer.student.weights) > 0
    assert {id(v) for v in trainer.trainable_variables} == student_ids
    assert not trainer.teacher.trainable_variables

    trainer.compile(optimizer=make_optimizer(1e-3, decay_to_zero_steps=6),
                    jit_compile=True, steps_per_execution=3)
    teacher_before = [w.copy() for w in trainer.teacher.get_weights()]
    student_before = [w.copy() for w in trainer.student.get_weights()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(_labelled(), steps_per_epoch=6, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]
    for before, after in zip(teacher_before, trainer.teacher.get_weights()):
        np.testing.assert_array_equal(before, after)
    moved = {w.path: float(np.max(np.abs(_np(w) - b)))
             for w, b in zip(trainer.student.weights, student_before)}
    assert moved["guidance_embedding/dense2/kernel"] > 0.0  # w is being learned
    slot_shapes = sorted(tuple(v.shape) for v in trainer.optimizer.variables
                         if len(v.shape) > 0)
    student_shapes = sorted(tuple(v.shape) for v in trainer.student.trainable_variables
                            if len(v.shape) > 0)
    assert slot_shapes == sorted(student_shapes * 2)

    # The trained student samples with guidance as an input (and needs it).
    student = trainer.student_model(num_steps=2)
    label = np.array([1, 2], np.int32)
    assert student.sample(batch_size=2, label=label, guidance=[0.0, 3.0]).shape == \
        (2,) + SHAPE
    with pytest.raises(ValueError, match="guidance-conditioned: pass guidance"):
        student.sample(batch_size=2, label=label)


def test_stage_one_trainer_keras_file_round_trip(tmp_path):
    from keras_progdist.guided_distillation import GuidanceDistiller

    trainer = GuidanceDistiller(_guided_net("v", seed=11), parameterization="v",
                                w_min=0.5, w_max=3.0, guidance_embedding_scale=100.0)
    _randomize(trainer.student, seed=12)
    path = str(tmp_path / "stage_one.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.save(path)
    # Every variable exists at construction, so Keras has nothing to warn about.
    assert not [w for w in caught if "built" in str(w.message)]
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, GuidanceDistiller)
    assert loaded.built and loaded.count_params() == trainer.count_params()
    assert (loaded.w_min, loaded.w_max) == (0.5, 3.0)
    assert loaded.student.get_config() == trainer.student.get_config()
    for a, b in zip(loaded.student.get_weights(), trainer.student.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.teacher.get_weights(), trainer.teacher.get_weights()):
        np.testing.assert_array_equal(a, b)


# -- stage two: progressive distillation of the w-conditioned model ------------------------
def _w_net(parameterization="v", seed=13):
    """A guidance-conditioned U-Net with random weights (its w embedding included, so
    the prediction depends on w)."""
    out = 2 if parameterization == "both" else 1
    return _randomize(UNet(SHAPE, null_class=True, guidance_conditioned=True,
                           output_channels=out, **NET), seed)


class _ClassImages(keras.Model):
    """A closed-form w-conditioned teacher: `x_hat(z, t, c, w) = (1 + w) m_c - w m_null`
    whatever `z` and `t`, the guided denoiser of data made of one image `m_c` per class
    (`m_null` standing for the unconditional prediction). DDIM with a constant `x_hat`
    lands on it, so every two-step target is exactly `(1 + w) m_c - w m_null`."""

    guidance_conditioned = True

    def __init__(self, means, record=None):
        super().__init__()
        self.means = ops.convert_to_tensor(means)
        self.num_classes = len(means) - 1
        # (label, w) of every call, when run eagerly; kept out of Keras' tracking.
        object.__setattr__(self, "record", record)

    def call(self, inputs, training=False):
        z, t, label, w = inputs
        if self.record is not None:
            self.record.append((_np(label), _np(w)))
        w = ops.reshape(w, (-1, 1, 1, 1))
        return (1.0 + w) * ops.take(self.means, label, axis=0) - w * self.means[-1]


def _class_images(seed=14):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (CLASSES + 1,) + SHAPE).astype(np.float32)


def test_guided_two_step_target_is_the_closed_form_guided_prediction():
    from keras_progdist.distillation import Distiller

    means = _class_images()
    num_steps = 4
    distiller = Distiller(_w_net("x"), parameterization="x", num_steps=num_steps,
                          w_min=0.0, w_max=4.0)
    distiller.teacher = _ClassImages(means)
    rng = np.random.default_rng(15)
    n = 8
    images = rng.uniform(-1, 1, (n,) + SHAPE).astype(np.float32)
    eps = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    label = rng.integers(0, CLASSES, (n,)).astype(np.int32)
    # i = 1..4 twice (u in the middle of each bin): t = 1 and the t'' = 0 case included.
    u = ((np.arange(n) % num_steps) + 0.5).astype(np.float32) / num_steps
    w = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 1.5, 2.5], np.float32)
    _, t, x_tilde = distiller.targets(images, label, u, eps, w)
    np.testing.assert_array_equal(_np(t), (np.arange(n) % num_steps + 1) / num_steps)
    w4 = w[:, None, None, None]
    expected = (1 + w4) * means[label] - w4 * means[-1]
    # Measured: ~1e-6 (float32 round-off of the two steps and the solve for x~).
    np.testing.assert_allclose(_np(x_tilde), expected, rtol=1e-5, atol=2e-5)


def test_guided_distillation_loss_uses_one_w_per_example_for_teacher_and_student():
    from keras_progdist.distillation import Distiller

    distiller = Distiller(_w_net("x"), parameterization="x", num_steps=4, w_min=0.0,
                          w_max=4.0, seed=5)
    calls = []
    distiller.teacher = distiller.student = _ClassImages(_class_images(), calls)
    images, labels = _first_batch()
    # The student is the teacher's closed-form function: its x_hat at (z_t, t, c, w) is
    # the target, if and only if both see the same (c, w).
    assert float(distiller.compute_loss(x=images, y=labels)) < 1e-9
    # Teacher step 1, teacher step 2, student: the data's labels and one w per example.
    assert len(calls) == 3
    for label, w in calls:
        np.testing.assert_array_equal(label, labels)
        np.testing.assert_array_equal(w, calls[0][1])
    w = calls[0][1]
    assert w.shape == (len(labels),) and len(np.unique(w)) == len(w)
    assert w.min() >= 0.0 and w.max() <= 4.0


def _numpy_two_steps(net, z, t, label, w, num_steps, parameterization):
    """The teacher's two DDIM steps `t -> t - 0.5/N -> t - 1/N` for ONE example, in
    numpy apart from the network: `z_s = alpha_s x_hat + sigma_s eps_hat`."""
    z = np.asarray(z, np.float32)[None]
    for t_now, t_next in ((t, t - 0.5 / num_steps), (t - 0.5 / num_steps,
                                                      t - 1.0 / num_steps)):
        x_hat, eps_hat = (_np(v) for v in network_denoise(
            net, z, np.array([t_now], np.float32), SCHEDULE, parameterization,
            np.array([label], np.int32), guidance=np.array([w], np.float32)))
        if t_next <= 0:
            return x_hat[0]
        alpha, sigma = (float(_np(v)) for v in SCHEDULE.alpha_sigma(np.float32(t_next)))
        z = alpha * x_hat + sigma * eps_hat
    return z[0]


@pytest.mark.parametrize("parameterization", ["x", "v"])
def test_one_student_step_lands_on_two_guided_teacher_steps(parameterization):
    from keras_progdist.distillation import Distiller

    num_steps = 8
    net = _w_net(parameterization)
    distiller = Distiller(net, parameterization=parameterization, num_steps=num_steps)
    rng = np.random.default_rng(16)
    n = 4
    images = rng.uniform(-1, 1, (n,) + SHAPE).astype(np.float32)
    eps = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    label = np.array([1, 4, 4, 9], np.int32)
    indices = np.array([3, 5, 5, 7])
    u = (indices - 0.5).astype(np.float32) / num_steps
    w = np.array([0.0, 1.0, 4.0, 2.5], np.float32)
    z_t, t, x_tilde = (_np(v) for v in distiller.targets(images, label, u, eps, w))
    t_end = t - 1.0 / num_steps
    # One student DDIM step t -> t'' with x_hat = x~.
    alpha, sigma = (_np(v)[:, None, None, None] for v in SCHEDULE.alpha_sigma(t))
    alpha_e, sigma_e = (_np(v)[:, None, None, None] for v in SCHEDULE.alpha_sigma(t_end))
    z_student = alpha_e * x_tilde + sigma_e * (z_t - alpha * x_tilde) / sigma
    teacher = np.stack([_numpy_two_steps(distiller.teacher, z_t[k], t[k], label[k], w[k],
                                         num_steps, parameterization) for k in range(n)])
    np.testing.assert_allclose(z_student, teacher, atol=1e-4)
    # Examples 1 and 2 differ only in w, and w matters: one shared w would be caught.
    assert np.abs(teacher[1] - teacher[2]).max() > 1e-3


def test_guided_ladder_distills_down_to_one_step():
    from keras_progdist.distillation import Distiller

    distiller = Distiller(_w_net("v"), parameterization="v", num_steps=2, w_min=0.0,
                          w_max=4.0, seed=2)
    assert distiller.guidance_conditioned
    student_ids = {id(v) for v in distiller.student.trainable_variables}
    assert {id(v) for v in distiller.trainable_variables} == student_ids
    teacher_before = [w.copy() for w in distiller.teacher.get_weights()]
    students = distiller.distill_ladder(_labelled(), min_steps=1, updates_per_stage=3,
                                        learning_rate=1e-4, verbose=0,
                                        steps_per_execution=3)
    assert [s.num_steps for s in students] == [2, 1]
    label = np.array([3, 3], np.int32)
    for student in students:
        assert student.network.guidance_conditioned
        images = student.sample(batch_size=2, label=label, guidance=[0.0, 4.0], seed=0)
        assert np.all(np.isfinite(images))
    # The first student trained away from the teacher it started as.
    assert any(np.abs(a - b).max() > 0 for a, b in
               zip(teacher_before, students[0].network.get_weights()))


def test_guided_distiller_config_round_trip_and_old_configs():
    from keras_progdist.distillation import Distiller

    distiller = Distiller(_w_net("v"), parameterization="v", num_steps=4, w_min=1.0,
                          w_max=3.0)
    restored = Distiller.from_config(distiller.get_config())
    assert restored.guidance_conditioned and (restored.w_min, restored.w_max) == (1.0, 3.0)
    old = {k: v for k, v in Distiller(_randomize(UNet(SHAPE, **NET)), num_steps=2)
           .get_config().items() if k not in ("w_min", "w_max")}
    assert not Distiller.from_config(old).guidance_conditioned
