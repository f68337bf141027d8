#!/usr/bin/env bash
# Set up, then the whole suite on TensorFlow; the backend-agnostic tests on JAX run beside
# its slow end-to-end part.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(KPD_TEST_DEPS=1 bash "$ROOT/bin/setup_env.sh" | tail -n 1)"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2}"
echo "== Lint (ruff: unused and undefined names, syntax)"
"$VENV/bin/ruff" check --quiet .
# Two test processes at a time (pytest-xdist): most of a test's time is single-threaded
# tracing and compiling, so two of them fill the two cores a CI machine has. A test file
# goes to one worker whole, so a module's fixture is built once. (`--dist loadgroup`
# would place single tests, but with pytest 9 its groups are ignored: the fixtures were
# built on both workers.) KPD_TEST_WORKERS=0 runs everything in this process.
WORKERS=(-n "${KPD_TEST_WORKERS:-2}" --dist loadfile)
if [ "${KPD_TEST_WORKERS:-2}" = "0" ]; then WORKERS=(); fi
# The slow end-to-end tests get processes of their own: one TensorFlow process that ran
# every test grew to ~20 GB, since TF keeps every traced function alive.
PYTEST=("$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${WORKERS[@]}")
echo "== TensorFlow backend: all tests but the slow end-to-end ones"
KERAS_BACKEND=tensorflow "${PYTEST[@]}" -m "not slow" "$@"
# The JAX pass runs beside the slow TensorFlow tests, in one process: each pass ends with
# a worker idle while the other finishes its last file, and side by side the two passes
# fill each other's idle time (the CPU is otherwise saturated, so this saves only that).
JAX_LOG="$(mktemp)"
trap 'rm -f "$JAX_LOG"' EXIT
KERAS_BACKEND=jax "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 \
  -m "not slow" \
  tests/test_schedules.py tests/test_parameterizations.py tests/test_losses.py \
  tests/test_samplers.py tests/test_unet.py tests/test_diffusion.py \
  tests/test_distillation.py tests/test_checkpoint.py tests/test_array_data.py \
  tests/test_image_folder.py tests/test_preemption.py tests/test_workdir.py \
  tests/test_keras_compat.py tests/test_config.py tests/test_samples.py \
  tests/test_report.py tests/test_guidance.py tests/test_guided_benchmark.py \
  tests/test_distill_diagnostics.py "$@" > "$JAX_LOG" 2>&1 &
JAX_PID=$!
echo "== TensorFlow backend: the slow end-to-end tests (the JAX pass runs beside them)"
SLOW_RC=0
KERAS_BACKEND=tensorflow "${PYTEST[@]}" -m slow "$@" || SLOW_RC=$?
JAX_RC=0
wait "$JAX_PID" || JAX_RC=$?
echo "== JAX backend: backend-agnostic tests, preemption (TensorFlow made unimportable)"
cat "$JAX_LOG"
if [ "$SLOW_RC" != 0 ] || [ "$JAX_RC" != 0 ]; then
  echo "FAILED: slow TensorFlow tests exit $SLOW_RC, JAX tests exit $JAX_RC" >&2
  exit 1
fi
