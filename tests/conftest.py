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


# Module- and session-scoped fixtures that take many seconds to build: trained work
# directories, an export, worker processes, the FID network. bin/test.sh runs two
# pytest-xdist workers with `--dist loadgroup`: the tests of a file that use one of these
# are grouped onto one worker, so the fixture is built once; every other test goes to
# whichever worker is free.
SHARED_FIXTURES = {
    "trained_workdir", "reference", "exported", "trained", "workers", "mirrored",
    "data_parallel", "run_py_tpu", "real_images", "fid_model", "keras_features",
    "torch_features", "mnist", "tfds_dir",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "tensorflow_only: needs the TensorFlow backend")
    config.addinivalue_line("markers", "jax_only: needs the JAX backend")
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more")
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        if SHARED_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        if "tensorflow_only" in item.keywords and backend != "tensorflow":
            item.add_marker(pytest.mark.skip(reason="TensorFlow backend only"))
        if "jax_only" in item.keywords and backend != "jax":
            item.add_marker(pytest.mark.skip(reason="JAX backend only"))
