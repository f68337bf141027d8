#!/usr/bin/env bash
# Set up, then the whole suite on TensorFlow, then the backend-agnostic tests on JAX.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(KPD_TEST_DEPS=1 bash "$ROOT/bin/setup_env.sh" | tail -n 1)"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2}"
# One persistent JAX compilation cache for every JAX process of the run (the JAX pass's
# workers and the subprocesses that tests start on either pass): a resumed or repeated
# run loads the executables its first run compiled (a 40-update teacher on 2 cores:
# 21 s cold, 9 s warm). Compilations under 0.1 s are not worth a file.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.1}"
echo "== Lint (ruff: the rules in ruff.toml)"
"$VENV/bin/ruff" check --quiet .
# Two test processes at a time (pytest-xdist): most of a test's time is single-threaded
# tracing and compiling, so two of them fill the two cores a CI machine has. A test file
# goes to one worker whole, so a module's fixture is built once. (`--dist loadgroup`
# would place single tests, but with pytest 9 its groups are ignored: the fixtures were
# built on both workers.) Files go out longest first, in the order tests/conftest.py
# collects them (`--no-loadscope-reorder`: xdist would otherwise order files by their
# number of tests). KPD_TEST_WORKERS=0 runs everything in this process.
WORKERS=(-n "${KPD_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
if [ "${KPD_TEST_WORKERS:-2}" = "0" ]; then WORKERS=(); fi
# The slow end-to-end tests get processes of their own: one TensorFlow process that ran
# every test grew to ~20 GB, since TF keeps every traced function alive.
PYTEST=("$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${WORKERS[@]}")
echo "== TensorFlow backend: all tests but the slow end-to-end ones"
KERAS_BACKEND=tensorflow "${PYTEST[@]}" -m "not slow" "$@"
echo "== TensorFlow backend: the slow end-to-end tests"
KERAS_BACKEND=tensorflow "${PYTEST[@]}" -m slow "$@"
echo "== JAX backend: backend-agnostic tests, preemption (TensorFlow made unimportable)"
KERAS_BACKEND=jax "${PYTEST[@]}" -m "not slow" \
  tests/test_schedules.py tests/test_parameterizations.py tests/test_losses.py \
  tests/test_samplers.py tests/test_unet.py tests/test_diffusion.py \
  tests/test_distillation.py tests/test_checkpoint.py tests/test_array_data.py \
  tests/test_image_folder.py tests/test_preemption.py tests/test_workdir.py \
  tests/test_keras_compat.py tests/test_config.py tests/test_samples.py \
  tests/test_report.py tests/test_guidance.py tests/test_guided_benchmark.py \
  tests/test_distill_diagnostics.py tests/test_bootstrap.py tests/test_sample_files_checks.py \
  tests/test_fid_weight_pin.py "$@"
