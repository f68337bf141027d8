#!/usr/bin/env bash
# The Fashion-MNIST run on one GPU slot (JAX, no TensorFlow): teacher, every distillation
# stage, --mode=sample, then OUTDIR packed to at most 8 files of at most 16 MiB.
#   bash benchmarks/fashion_mnist_gpu.sh OUTDIR [--time_budget_s=S] [--workdir=DIR]
#        [--data_dir=DIR] [bin/run.py flags such as --gin_param=...]
# Exit 0: done (a re-run is a quick no-op); 143: the budget ran out, run it again;
# 2: bad arguments or missing data. See benchmarks/fashion_mnist_gpu.py for the details.
# PROGDIST_PYTHON (a command prefix, default python3) runs the Python parts.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export KERAS_BACKEND=jax
# shellcheck disable=SC2086  # PROGDIST_PYTHON is a command prefix, split on purpose
exec ${PROGDIST_PYTHON:-python3} "$HERE/fashion_mnist_gpu.py" "$@"
