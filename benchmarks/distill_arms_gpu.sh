#!/usr/bin/env bash
# benchmarks/distill_arms.py on a lent JAX GPU machine (no TensorFlow), in two calls of
# one warm machine, because the FID network's weight cache (83 MiB) is larger than what
# one call may carry:
#
#   call 1  carry .whl (keras, namex, optree, gin-config wheels), .gpu_data/fashion-mnist
#           (the idx files) and .carry/fid.part-aa (the cache's first bytes):
#             bash benchmarks/distill_arms_gpu.sh start BUDGET_S [distill_arms.py flags]
#           installs the wheels, starts the driver in its own session (it outlives the
#           call) with BUDGET_S seconds, and returns at once.
#   call 2  carry the other parts (.carry/fid.part-ab, -ac) and .carry/<cache>.sha256:
#             bash benchmarks/distill_arms_gpu.sh finish SECONDS_OF_THIS_CALL
#           joins and checks the cache (the driver scores once it appears), moves the
#           driver's deadline so that it ends inside this call, waits for it, and packs
#           results.json, logs.tar.gz and the samples into $OUT.
#
# Here (to split the cache): bash benchmarks/gpu_fid_cache.sh split ~/.cache/keras_progdist .carry
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=.gpu_runs
export PYTHONPATH="$PWD/.site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1 \
  KERAS_PROGDIST_CACHE="$PWD/.carry/cache" TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$RUNS" .carry/cache

case "${1:-}" in
start)
  budget="${2:?start BUDGET_S}"
  shift 2  # the rest: more distill_arms.py flags (e.g. --arms=..., --gin_param=...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl || exit 2
  nvidia-smi -L || true
  python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
  date +%s > "$RUNS/started"
  setsid nohup python3 benchmarks/distill_arms.py "$RUNS/arms" \
    --data_dir=.gpu_data/fashion-mnist --time_budget_s="$budget" \
    --deadline_file="$RUNS/deadline" --wait_for_fid_s=900 --parallel=6 "$@" \
    > "$RUNS/driver.log" 2>&1 < /dev/null &
  echo $! > "$RUNS/driver.pid"
  sleep 15
  cat "$RUNS/driver.log"
  ;;
finish)
  seconds="${2:?finish SECONDS_OF_THIS_CALL}"
  began=$(date +%s)
  # Stop training so that sampling, scoring and packing fit in this call (the driver
  # keeps --reserve_s for the first two; 40 s more for the packing and the transfer).
  echo $((began + seconds - 40)) > "$RUNS/deadline"
  bash benchmarks/gpu_fid_cache.sh join .carry .carry/cache \
    || echo "no FID cache: the driver will return samples only"
  pid=$(cat "$RUNS/driver.pid")
  while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - began )) -lt $((seconds - 30)) ]; do
    sleep 2
  done
  kill -0 "$pid" 2>/dev/null && echo "driver still running: packing what is there"
  tail -n 60 "$RUNS/driver.log"
  cp "$RUNS/driver.log" "$OUT/driver.log"
  python3 benchmarks/distill_arms.py "$RUNS/arms" --data_dir=.gpu_data/fashion-mnist \
    --pack="$OUT"
  ls -la "$OUT"
  ;;
*)
  echo "usage: distill_arms_gpu.sh start BUDGET_S | finish SECONDS" >&2
  exit 2
  ;;
esac
