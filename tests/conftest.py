"""Test setup: TensorFlow is the default backend; `KERAS_BACKEND=jax` runs the
backend-agnostic tests on JAX. Tests that need one backend mark themselves
`@pytest.mark.tensorflow_only` / `jax_only` and are skipped on the other."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX uses one CPU core unless told otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true "
                                   "intra_op_parallelism_threads=2")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "tensorflow_only: needs the TensorFlow backend")
    config.addinivalue_line("markers", "jax_only: needs the JAX backend")
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more")


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        if "tensorflow_only" in item.keywords and backend != "tensorflow":
            item.add_marker(pytest.mark.skip(reason="TensorFlow backend only"))
        if "jax_only" in item.keywords and backend != "jax":
            item.add_marker(pytest.mark.skip(reason="JAX backend only"))
