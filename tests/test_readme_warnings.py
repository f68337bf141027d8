"""The README's Python API block, at toy sizes: no warning a user cannot act on, and a
saved student reloads built (`count_params()`), sampling what the original sampled.

The calls are the block's (`make_dataset`, `DiffusionModel.fit`, `Distiller.distill_ladder`,
`sample`, `save`, `load_model(safe_mode=True)`); only the sizes are cut (8x8 images, a
one-level U-Net, a few updates) and training is not XLA-compiled (`jit_compile=False`
saves ~20 s of compilation here; the README's `jit_compile=True` passes this test too). `teacher.fit` passes `shuffle=False` as the README does:
the dataset is an already shuffled, repeating tf.data stream, and Keras' default
`shuffle=True` only makes it warn that the argument is ignored.
"""

import logging
import warnings

import keras
import numpy as np
import pytest

import keras_progdist  # noqa: F401  registers the classes load_model needs
from keras_progdist import data
from keras_progdist.diffusion import DiffusionModel
from keras_progdist.distillation import Distiller
from keras_progdist.networks import UNet
from keras_progdist.optimizers import make_optimizer

# What Keras says when a model is saved or queried unbuilt, or an argument of `fit`
# goes unused. None of these may appear.
FORBIDDEN = ("not yet been built", "isn't built", "ignored")
LOGGERS = ("", "absl", "tensorflow", "keras")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def everything_said():
    """Every Python warning (each one, not once per place) and every log record of the
    root, absl, TensorFlow and Keras loggers while the test runs."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught, handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


def _offending(caught, messages):
    said = [f"{w.category.__name__}: {w.message}" for w in caught] + list(messages)
    return [m for m in said if any(f in m for f in FORBIDDEN)]


def test_readme_block_warns_nothing_and_reloads_built(tmp_path, everything_said):
    caught, messages = everything_said
    ds = data.make_dataset("mnist_embedded", batch_size=8, image_size=8)
    teacher = DiffusionModel(UNet((8, 8, 1), channels=8, channel_mult=(1,),
                                  num_res_blocks=1, attention_resolutions=()),
                             parameterization="v", weighting="snr_trunc", ema_decay=0.995,
                             num_steps=4)
    teacher.compile(optimizer=make_optimizer(2e-3, warmup_steps=2), jit_compile=False,
                    steps_per_execution=2)
    teacher.fit(ds, steps_per_epoch=2, shuffle=False, verbose=0)
    teacher.sample(batch_size=2, seed=0)

    distiller = Distiller(teacher.sampling_network, parameterization="v", num_steps=2)
    students = distiller.distill_ladder(ds, min_steps=1, updates_per_stage=2,
                                        learning_rate=5e-4, steps_per_execution=2,
                                        jit_compile=False, verbose=0)
    assert [s.num_steps for s in students] == [2, 1]
    student = students[-1]
    fast = student.sample(batch_size=4, seed=0)
    path = str(tmp_path / "student_1step.keras")
    student.save(path)
    teacher.save(str(tmp_path / "teacher.keras"))
    distiller.save(str(tmp_path / "distiller.keras"))

    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert reloaded.built
    assert reloaded.count_params() == student.count_params() > 0
    np.testing.assert_array_equal(reloaded.sample(batch_size=4, seed=0), fast)
    for name, original in (("teacher", teacher), ("distiller", distiller)):
        again = keras.saving.load_model(str(tmp_path / f"{name}.keras"), safe_mode=True)
        assert again.count_params() == original.count_params() > 0, name

    assert _offending(caught, messages) == []


def test_a_fresh_student_is_built_and_saves_silently(tmp_path, everything_said):
    """A model never run through `__call__` (what `Distiller.student_model` returns) is
    built: `count_params()` works and `save()` does not warn."""
    caught, messages = everything_said
    network = UNet((8, 8, 1), channels=8, channel_mult=(1,), num_res_blocks=1,
                   attention_resolutions=())
    model = DiffusionModel(network, ema_decay=None, num_steps=2)
    assert model.built
    assert model.count_params() == network.count_params()
    model.save(str(tmp_path / "fresh.keras"))
    again = keras.saving.load_model(str(tmp_path / "fresh.keras"), safe_mode=True)
    assert again.count_params() == network.count_params()
    distiller = Distiller(network, num_steps=2)
    assert distiller.built
    # teacher + student + the step count N
    assert distiller.count_params() == 2 * network.count_params() + 1
    distiller.save(str(tmp_path / "distiller.keras"))
    assert _offending(caught, messages) == []
