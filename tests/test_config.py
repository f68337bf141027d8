"""The configuration schema (`training/config.py`): the `evaluate` settings and their
checks, the dataset settings handed to evaluation, and gin parsing for entry points."""

import os

import pytest

import gin
from keras_progdist import validation
from keras_progdist.settings import EvaluateSettings, as_record
from keras_progdist.training import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_evaluate_defaults_are_evaluate_settings():
    cfg = config.evaluate()
    assert isinstance(cfg, EvaluateSettings) and cfg == EvaluateSettings()
    assert as_record(cfg) == {
        "num_samples": 1000, "num_reference": 5000, "ddim_steps": (1, 2, 4, 8),
        "teacher_steps": (), "batch_size": 100, "split": "train", "seed": 2024,
        "cache_dir": None, "max_file_mb": 256.0, "bootstrap": 50, "digit_scores": True}


def test_gin_bindings_reach_evaluate_and_the_old_selector_still_works():
    config.parse_gin([os.path.join(ROOT, "gin", "tiny.gin")],
                     ["evaluate.teacher_steps=[16, 3]", "evaluate.max_file_mb=16",
                      # The full selector of saved operative configs (before the move).
                      "keras_progdist.evaluation.report.evaluate.seed = 7"])
    cfg = config.evaluate()
    assert cfg.num_samples == 128 and cfg.num_reference == 512
    assert cfg.batch_size == 64 and cfg.ddim_steps == (1, 2, 4, 8)
    assert cfg.teacher_steps == (16, 3) and cfg.seed == 7
    assert cfg.max_file_mb == 16.0 and isinstance(cfg.max_file_mb, float)


@pytest.mark.parametrize("binding,message", [
    ("num_samples='x'", "evaluate.num_samples must be an integer >= 2, got 'x'"),
    ("num_samples=1", "evaluate.num_samples must be an integer >= 2, got 1"),
    ("num_reference=True", "evaluate.num_reference must be an integer >= 2, got True"),
    ("batch_size=2.5", "evaluate.batch_size must be an integer >= 2, got 2.5"),
    ("ddim_steps=4", "evaluate.ddim_steps must be a tuple of step counts, got 4"),
    ("ddim_steps=(1, 0)", "evaluate.ddim_steps[1] must be a positive integer, got 0"),
    ("teacher_steps=('8',)", "evaluate.teacher_steps[0] must be a positive integer"),
    ("split=''", "evaluate.split must be a split name, got ''"),
    ("seed=-1", "evaluate.seed must be an integer >= 0, got -1"),
    ("cache_dir=3", "evaluate.cache_dir must be a folder name or None, got 3"),
    ("max_file_mb=0", "evaluate.max_file_mb must be a finite number > 0, got 0"),
])
def test_bad_evaluate_settings_name_the_setting(binding, message):
    gin.parse_config(f"evaluate.{binding}")
    with pytest.raises(ValueError) as info:
        config.evaluate()
    assert message in str(info.value)
    assert isinstance(info.value, (config.PipelineError, validation.ConfigError))


def test_dataset_settings_are_the_bindings_as_given():
    assert config.dataset_settings() == {}
    config.parse_gin([], ["dataset.name='fashion_mnist'", "dataset.image_size=16",
                          "dataset.resize='pad'"])
    assert config.dataset_settings() == {"name": "fashion_mnist", "image_size": 16,
                                         "resize": "pad"}
    # A plain copy: changing it changes nothing in gin.
    config.dataset_settings()["name"] = "cifar10"
    assert config.dataset_settings()["name"] == "fashion_mnist"


def test_jit_compile_false_is_a_plain_graph_on_tensorflow_and_compiled_on_jax():
    # `teacher.jit_compile = False` (tiny.gin) picks TensorFlow's plain graph over XLA;
    # on JAX it must not make every training step run eagerly.
    import keras

    from keras_progdist import distribute

    settings = distribute.fit_settings(None, False, 10)
    assert settings == {"jit_compile": keras.backend.backend() == "jax",
                        "steps_per_execution": 10}
