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


# Seconds of work per test file on 2 CPU cores, TensorFlow backend (`--durations`,
# summed per file, rounded): (the "not slow" tests, the slow ones); only their order
# matters. pytest-xdist's `--dist loadfile` hands whole files to the workers in
# collection order, so the collection puts the longest files first
# (longest-processing-time-first scheduling): collected alphabetically, the 300-s
# pipeline file started last and the other worker sat idle for minutes. Files not listed
# take a few seconds and keep their places after these.
FILE_SECONDS = {
    "test_preemption.py": (135, 0), "test_export.py": (130, 10),
    "test_pipeline.py": (74, 185), "test_pipeline_guided.py": (0, 130),
    "test_pipeline_kills.py": (0, 110), "test_distillation.py": (40, 110),
    "test_readme.py": (0, 80), "test_diffusion.py": (86, 0), "test_guidance.py": (71, 0),
    "test_distribute.py": (0, 61), "test_inception_port.py": (56, 0),
    "test_unet.py": (50, 0), "test_samples.py": (14, 40),
    # The multi-process files, measured at load 10-20 (other jobs on the 2 cores): JAX
    # (run in the TF pass too, in subprocesses) and TensorFlow multi-worker.
    "test_multihost.py": (0, 1420), "test_multiworker_tf.py": (0, 2060),
    "test_gpu_benchmark.py": (29, 35), "test_digits.py": (34, 25), "test_report.py": (44, 0),
    "test_workdir.py": (27, 0),
    # Added this round, estimated from runs on a loaded machine (order only).
    "test_resume_stages.py": (3, 300), "test_bad_settings.py": (20, 150),
    "test_readme_warnings.py": (60, 0), "test_sample_files_checks.py": (10, 0),
}


def _expected_seconds(item) -> float:
    seconds = FILE_SECONDS.get(item.path.name, (0, 0))
    return seconds[1] if "slow" in item.keywords else seconds[0]


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: weigh only what runs
def pytest_collection_modifyitems(config, items):
    # Longest files first; a file's tests stay together and in their order (the sort is
    # stable and every test of a file gets the same key).
    by_file = {}
    for item in items:
        by_file[item.path] = max(by_file.get(item.path, 0), _expected_seconds(item))
    items.sort(key=lambda item: -by_file[item.path])
    backend = keras.backend.backend()
    for item in items:
        if "tensorflow_only" in item.keywords and backend != "tensorflow":
            item.add_marker(pytest.mark.skip(reason="TensorFlow backend only"))
        if "jax_only" in item.keywords and backend != "jax":
            item.add_marker(pytest.mark.skip(reason="JAX backend only"))
