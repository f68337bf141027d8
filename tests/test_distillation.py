"""Progressive distillation: the exact target, and distillation that works."""

import time

import keras
import numpy as np
import pytest
from keras import ops

from keras_progdist import data
from keras_progdist.diffusion import DiffusionModel, network_denoise
from keras_progdist.distillation import Distiller, distillation_target, teacher_two_steps
from keras_progdist.networks import UNet
from keras_progdist.optimizers import make_optimizer, reset_optimizer
from keras_progdist.samplers import ddim_sample, ddim_step
from keras_progdist.schedules import Schedule, alpha_sigma

SCHEDULE = Schedule("cosine")


def _random_net(parameterization, seed=0):
    net = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4,
               output_channels=2 if parameterization == "both" else 1)
    conv = net.get_layer("conv_out")
    # The zero-initialized output layer would make every prediction trivial.
    conv.kernel.assign(np.random.RandomState(seed).normal(0, 0.2, conv.kernel.shape))
    return net


def _student_step_error(parameterization, num_steps, indices):
    net = _random_net(parameterization)

    def teacher(z, t):
        return network_denoise(net, z, t, SCHEDULE, parameterization)

    z_t = np.random.RandomState(1).normal(size=(len(indices), 8, 8, 1)).astype("float32")
    t = ops.convert_to_tensor(np.asarray(indices, "float32") / num_steps)
    t_end = t - 1.0 / num_steps
    z_end, x_hat_last = teacher_two_steps(teacher, z_t, t, num_steps, SCHEDULE)
    x_tilde = distillation_target(z_t, z_end, x_hat_last, t, t_end, SCHEDULE)
    # One student DDIM step with x_hat = x~ (eps_hat from x~ and z_t).
    alpha, sigma = alpha_sigma(SCHEDULE.logsnr(t))
    eps_tilde = (z_t - ops.reshape(alpha, (-1, 1, 1, 1)) * x_tilde) / \
        ops.reshape(sigma, (-1, 1, 1, 1))
    z_student = ddim_step(z_t, x_tilde, eps_tilde, SCHEDULE.logsnr(t_end), t_end)
    return float(ops.max(ops.abs(z_student - z_end)))


@pytest.mark.parametrize("parameterization", ["x", "v", "both", "eps"])
def test_one_student_step_lands_on_two_teacher_steps(parameterization):
    # i = 1..N-1 covers interior steps; t = 1 is tested separately for eps below.
    error = _student_step_error(parameterization, 8, [1, 2, 3, 5, 7, 4])
    print(f"{parameterization}: max |z_student - z_teacher| = {error:.2e}")
    assert error <= 1e-4


def _numpy_ddim(denoise, z, num_steps):
    """DDIM written out in numpy float32, apart from the library's `ddim_step`:
    `z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t`, and `x_hat` at s = 0.
    The denoiser returns `(x_hat, eps_hat)` as `network_denoise` does."""
    z = np.asarray(z, np.float32)
    x_hats = []
    for i in range(num_steps):
        t = np.full((len(z),), (num_steps - i) / num_steps, np.float32)
        s = (num_steps - i - 1) / num_steps
        x_hat, eps_hat = (np.asarray(ops.convert_to_numpy(v), np.float32)
                          for v in denoise(z, t))
        x_hats.append(x_hat)
        if s == 0:
            return x_hat, x_hats
        logsnr_s = float(ops.convert_to_numpy(SCHEDULE.logsnr(s)))
        alpha_s = np.float32(np.sqrt(1 / (1 + np.exp(-logsnr_s))))
        sigma_s = np.float32(np.sqrt(1 / (1 + np.exp(logsnr_s))))
        z = alpha_s * x_hat + sigma_s * eps_hat
    return z, x_hats


@pytest.mark.parametrize("parameterization", ["x", "v", "both", "eps"])
def test_last_stage_target_is_the_teachers_second_x_hat(parameterization):
    # N = 1: t = 1, t' = 1/2, t'' = 0. The target must be the x_hat the teacher predicts
    # at (z_t', 1/2), where z_t' is the teacher's first DDIM step, and one student step
    # with it must land on the teacher's 2-step DDIM result (here computed by a numpy
    # DDIM, not by teacher_two_steps / ddim_step).
    net = _random_net(parameterization)

    def teacher(z, t):
        return network_denoise(net, z, t, SCHEDULE, parameterization)

    z_t = np.random.RandomState(1).normal(size=(3, 8, 8, 1)).astype("float32")
    t = ops.convert_to_tensor(np.ones((3,), "float32"))
    t_end = t - 1.0
    z_end, x_hat_last = teacher_two_steps(teacher, z_t, t, 1, SCHEDULE)
    x_tilde = ops.convert_to_numpy(
        distillation_target(z_t, z_end, x_hat_last, t, t_end, SCHEDULE))

    two_step, (x_hat_first, x_hat_second) = _numpy_ddim(teacher, z_t, 2)
    # float32 round-off only (measured: 0 on TensorFlow).
    tolerance = dict(rtol=1e-6, atol=1e-6)
    # The two teacher predictions differ, so taking the first one would be caught.
    assert np.abs(x_hat_first - x_hat_second).max() > 1.0
    np.testing.assert_allclose(x_tilde, x_hat_second, **tolerance)
    np.testing.assert_allclose(x_tilde, two_step, **tolerance)

    # The student: one DDIM step t = 1 -> 0 with x_hat = x~ lands on the teacher's
    # 2-step sample.
    student = ops.convert_to_numpy(
        ddim_sample(lambda z, t: ops.convert_to_tensor(x_tilde), z_t, 1, SCHEDULE))
    np.testing.assert_allclose(student, two_step, **tolerance)

    # The closed form used at t'' = 0 instead of the teacher's x_hat (sigma_t''/sigma_t
    # = exp(-10), alpha_t = exp(-10)) is off by ~4.5e-5 |z_t|: the tolerance resolves
    # that except for eps, whose x_hat at t = 1 is ~1/alpha_t = 2e4 times larger.
    unguarded = (ops.convert_to_numpy(z_end) - np.exp(-10.0) * z_t) / (1.0 - np.exp(-20.0))
    if parameterization != "eps":
        bound = tolerance["atol"] + tolerance["rtol"] * np.abs(x_hat_second)
        assert np.max(np.abs(unguarded - x_hat_second) - 10 * bound) > 0


def _teacher(train_steps=150):
    keras.utils.set_random_seed(0)
    net = UNet((16, 16, 1), channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(8,), num_groups=8)
    model = DiffusionModel(net, parameterization="v", ema_decay=None, seed=0)
    model.compile(optimizer=make_optimizer(2e-3, warmup_steps=20), jit_compile=True,
                  steps_per_execution=10)
    ds = data.make_dataset("mnist_embedded", batch_size=32, image_size=16, seed=0)
    model.fit(ds, steps_per_epoch=train_steps, verbose=0)
    return model, ds


def _ddim(net, noise, steps):
    def denoise(z, t):
        return network_denoise(net, z, t, SCHEDULE, "v")
    return ops.convert_to_numpy(ddim_sample(denoise, noise, steps, SCHEDULE))


@pytest.mark.slow
def test_distilled_student_beats_teacher_ddim_at_same_step_count():
    teacher, ds = _teacher()
    student_steps = 4
    noise = keras.random.normal((32, 16, 16, 1), seed=7)
    reference = _ddim(teacher.network, noise, 2 * student_steps)
    teacher_n = _ddim(teacher.network, noise, student_steps)
    before = float(np.mean((teacher_n - reference) ** 2))

    distiller = Distiller(teacher.network, parameterization="v", num_steps=student_steps,
                          seed=3)
    distiller.compile(optimizer=make_optimizer(5e-4, decay_to_zero_steps=120),
                      jit_compile=True, steps_per_execution=10)
    distiller.fit(ds, steps_per_epoch=120, verbose=0)
    student_n = _ddim(distiller.student, noise, student_steps)
    after = float(np.mean((student_n - reference) ** 2))
    print(f"MSE to the teacher's {2 * student_steps}-step samples: teacher DDIM "
          f"{student_steps} steps {before:.5f}, distilled {student_steps} steps {after:.5f}")
    # The student starts as the teacher, so `before` is also its own starting distance.
    assert after < 0.5 * before
    # The teacher is frozen: its weights never moved.
    for w_t, w_s in zip(distiller.teacher.weights, teacher.network.weights):
        np.testing.assert_array_equal(w_t.numpy(), w_s.numpy())


def test_new_stage_reuses_the_compiled_step():
    ds = data.make_dataset("mnist_embedded", batch_size=8, image_size=8, seed=0)
    net = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4)
    distiller = Distiller(net, parameterization="v", num_steps=8)
    distiller.compile(optimizer=make_optimizer(1e-4, decay_to_zero_steps=10),
                      jit_compile=True)
    start = time.time()
    distiller.fit(ds, steps_per_epoch=10, verbose=0)
    first = time.time() - start
    compiled = distiller.train_function
    # The stage's learning rate decayed linearly to exactly 0 at its last update.
    assert int(distiller.optimizer.iterations) == 10
    assert float(distiller.optimizer.learning_rate) == 0.0
    distiller.start_stage(distiller.student, 4)
    reset_optimizer(distiller.optimizer)
    # ... and the next stage starts again from the full rate.
    np.testing.assert_allclose(float(distiller.optimizer.learning_rate), 1e-4, rtol=1e-6)
    # The new stage's teacher is the previous stage's (trained) student.
    for a, b in zip(distiller.teacher.get_weights(), distiller.student.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(distiller.optimizer.iterations) == 0
    assert float(distiller.num_steps) == 4.0
    start = time.time()
    distiller.fit(ds, steps_per_epoch=10, verbose=0)
    second = time.time() - start
    print(f"stage 1 (with compilation) {first:.1f} s, stage 2 {second:.1f} s")
    assert distiller.train_function is compiled


@pytest.mark.parametrize("schedule, last_rate", [("linear", 0.0), ("constant", 3e-4)])
def test_stage_learning_rate_schedule(schedule, last_rate):
    """`linear` decays the stage's rate to exactly 0 at its last update; `constant` (the
    official code's shape) keeps it; a new stage starts again from the full rate."""
    ds = data.make_dataset("mnist_embedded", batch_size=8, image_size=8, seed=0)
    net = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4)
    distiller = Distiller(net, parameterization="v", num_steps=8)
    distiller.prepare_stage(net, 8, 6, 3e-4, jit_compile=False, steps_per_execution=1,
                            learning_rate_schedule=schedule)
    distiller.fit(ds, steps_per_epoch=6, verbose=0)
    assert int(distiller.optimizer.iterations) == 6
    np.testing.assert_allclose(float(distiller.optimizer.learning_rate), last_rate,
                               atol=1e-12)
    distiller.prepare_stage(distiller.student, 4, 6, 3e-4, jit_compile=False,
                            steps_per_execution=1, learning_rate_schedule=schedule)
    np.testing.assert_allclose(float(distiller.optimizer.learning_rate), 3e-4, rtol=1e-6)
    with pytest.raises(ValueError, match="learning_rate_schedule must be"):
        distiller.prepare_stage(net, 4, 6, 3e-4, learning_rate_schedule="cosine")


def test_distiller_round_trips_through_keras_saving(tmp_path):
    net = _random_net("v")
    distiller = Distiller(net, parameterization="v", num_steps=16)
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert float(loaded.num_steps) == 16.0
    for a, b in zip(loaded.student.get_weights(), distiller.student.get_weights()):
        np.testing.assert_array_equal(a, b)


def _small_net(dropout=0.0):
    return UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_groups=4, dropout=dropout)


def test_trainable_set_is_exactly_the_students_even_from_an_ema_network():
    import warnings

    teacher = DiffusionModel(_small_net(), parameterization="v", ema_decay=0.99)
    ema = teacher.sampling_network
    assert ema is teacher.ema_network and not ema.trainable
    distiller = Distiller(ema, parameterization="v", num_steps=4, seed=1)
    student_ids = {id(v) for v in distiller.student.trainable_variables}
    assert distiller.student.trainable and not distiller.teacher.trainable
    assert len(distiller.student.trainable_variables) > 0
    assert {id(v) for v in distiller.trainable_variables} == student_ids
    assert len(distiller.trainable_variables) == len(distiller.student.trainable_variables)

    ds = data.make_dataset("mnist_embedded", batch_size=8, image_size=8, seed=0)
    distiller.compile(optimizer=make_optimizer(1e-3, decay_to_zero_steps=6),
                      jit_compile=True, steps_per_execution=3)
    teacher_before = [w.copy() for w in distiller.teacher.get_weights()]
    student_before = [w.copy() for w in distiller.student.get_weights()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distiller.fit(ds, steps_per_epoch=6, verbose=0)
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]
    for before, after in zip(teacher_before, distiller.teacher.get_weights()):
        np.testing.assert_array_equal(before, after)
    moved = max(float(np.max(np.abs(a - b)))
                for a, b in zip(student_before, distiller.student.get_weights()))
    assert moved > 0.0
    # Adam keeps slots for the student's variables only (plus its step and rate).
    slot_shapes = sorted(tuple(v.shape) for v in distiller.optimizer.variables
                         if len(v.shape) > 0)
    student_shapes = sorted(tuple(v.shape) for v in distiller.student.trainable_variables
                            if len(v.shape) > 0)
    assert slot_shapes == sorted(student_shapes * 2)


def _training_outputs(network, seed=0):
    z = np.random.RandomState(seed).normal(size=(4, 8, 8, 1)).astype("float32")
    t = np.full((4,), 0.5, "float32")
    return [ops.convert_to_numpy(network([z, t], training=True)) for _ in range(2)]


def test_student_trains_without_dropout_unless_configured():
    # A teacher trained with dropout (as the paper's are) must not pass it on.
    network = _small_net(dropout=0.3)
    # Zero-initialized convolutions after each dropout would hide it: randomize all.
    rng = np.random.RandomState(0)
    network.set_weights([rng.normal(0, 0.2, w.shape).astype(w.dtype)
                         for w in network.get_weights()])
    default = Distiller(network, parameterization="v", num_steps=4)
    assert default.student.get_config()["dropout"] == 0.0
    first, second = _training_outputs(default.student)
    np.testing.assert_array_equal(first, second)

    with_dropout = Distiller(network, parameterization="v", num_steps=4,
                             student_dropout=0.3)
    assert with_dropout.student.get_config()["dropout"] == 0.3
    assert with_dropout.teacher.get_config()["dropout"] == 0.0
    first, second = _training_outputs(with_dropout.student)
    assert float(np.max(np.abs(first - second))) > 1e-4
    restored = Distiller.from_config(with_dropout.get_config())
    assert restored.student_dropout == 0.3
    with pytest.raises(ValueError, match="student_dropout"):
        Distiller(network, parameterization="v", num_steps=4, student_dropout=1.5)
