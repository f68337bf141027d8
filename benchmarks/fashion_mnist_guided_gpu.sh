#!/usr/bin/env bash
# benchmarks/fashion_mnist_guided.py on a lent JAX GPU machine (no TensorFlow), in two
# calls of one warm machine, because the FID network's weight cache (83 MiB) is larger
# than what one call may carry:
#
#   call 1  carry .whl (keras, namex, optree, gin-config wheels), .gpu_data/fashion-mnist
#           (the idx files) and .carry/fid.part-aa (the cache's first bytes):
#             bash benchmarks/fashion_mnist_guided_gpu.sh start BUDGET_S [flags]
#           installs the wheels, then trains in its own session (it outlives the call)
#           for at most BUDGET_S seconds: the guided teacher, stage one and the ladder,
#           then the classifier; it returns at once.
#   call 2  carry the other parts (.carry/fid.part-ab, -ac) and .carry/<cache>.sha256:
#             bash benchmarks/fashion_mnist_guided_gpu.sh finish SECONDS_OF_THIS_CALL
#           joins and checks the cache, waits for the training (stopping it in time to
#           score), scores every finished (model, w) and writes the table within this
#           call, and packs the table, plot and a tarball of scores, grids and logs into
#           $OUT (5 files).
#
# [flags] are fashion_mnist_guided.py's (e.g. --gin_param=..., --ws=..., --steps=...);
# `start` records them and `finish` reuses them, so both calls score the same run.
# GUIDED_GPU_RUNS, GUIDED_GPU_DATA, GUIDED_GPU_WHEELS and PROGDIST_PYTHON (a command
# prefix) move the run folder, the data, the wheels and the interpreter elsewhere.
# Both calls are resumable: a second `start` goes on from the last checkpoints and a
# second `finish` only scores what is not scored yet.
#
# Here (to split the cache): bash benchmarks/gpu_fid_cache.sh split ~/.cache/keras_progdist .carry
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=${GUIDED_GPU_RUNS:-.gpu_runs/guided}
PY=${PROGDIST_PYTHON:-python3}
export PYTHONPATH="$PWD/.site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1 \
  KERAS_PROGDIST_CACHE="${KERAS_PROGDIST_CACHE:-$PWD/.carry/cache}" TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$RUNS" "$KERAS_PROGDIST_CACHE"
BASE=(benchmarks/fashion_mnist_guided.py --workdir="$RUNS/work"
      --data_dir="${GUIDED_GPU_DATA:-.gpu_data/fashion-mnist}"
      --results_name=fashion_mnist_gpu_guided)

case "${1:-}" in
start)
  budget="${2:?start BUDGET_S}"
  shift 2
  printf '%s\n' "$@" > "$RUNS/flags"  # one flag a line: finish reads them back verbatim
  wheels=${GUIDED_GPU_WHEELS:-.whl}
  if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target .site "$wheels"/*.whl || exit 2
  fi
  nvidia-smi -L 2>/dev/null || true
  $PY -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
  # Bad flags or data fail here, in this call, before anything is started.
  $PY "${BASE[@]}" "$@" --check_only || exit 2
  setsid nohup $PY "${BASE[@]}" "$@" --piece=teacher,distill,classifier \
    --time_budget_s="$budget" > "$RUNS/train.log" 2>&1 < /dev/null &
  echo $! > "$RUNS/train.pid"
  sleep 15
  tail -n 20 "$RUNS/train.log"
  ;;
finish)
  seconds="${2:?finish SECONDS_OF_THIS_CALL}"
  began=$(date +%s)
  flags=()
  [ -f "$RUNS/flags" ] && mapfile -t flags < "$RUNS/flags"
  bash benchmarks/gpu_fid_cache.sh join .carry "$KERAS_PROGDIST_CACHE"
  # Training gets at most half of this call; scoring, the table and packing the rest.
  pid=$(cat "$RUNS/train.pid" 2>/dev/null || echo 0)
  while [ "$pid" != 0 ] && kill -0 "$pid" 2>/dev/null \
      && [ $(( $(date +%s) - began )) -lt $((seconds / 2)) ]; do
    sleep 2
  done
  if [ "$pid" != 0 ] && kill -0 "$pid" 2>/dev/null; then
    # SIGTERM: the training stage saves a checkpoint and exits; a later start goes on.
    echo "training still running at half of this call: stopping it at a checkpoint"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    while kill -0 -- "-$pid" 2>/dev/null; do sleep 1; done  # bin/run.py saving
  fi
  tail -n 30 "$RUNS/train.log"
  left=$(( seconds - ($(date +%s) - began) - 45 ))  # 45 s for the table and the packing
  if [ "$left" -gt 0 ]; then
    $PY "${BASE[@]}" "${flags[@]}" --piece=eval --time_budget_s="$left" 2>&1 \
      | tee "$RUNS/eval.log" | grep -v "^I0000"
  fi
  $PY "${BASE[@]}" "${flags[@]}" --piece=table 2>&1 | tail -n 40
  out="${OUT:?finish packs into \$OUT}"
  cp benchmarks/results/fashion_mnist_gpu_guided.* "$out/" 2>/dev/null
  tar -czf "$out/guided_runs.tar.gz" "$RUNS"/*.log "$RUNS/flags" \
    "$RUNS/work/eval/guided/runs" "$RUNS/work/eval/guided/grids" "$RUNS/work/logs" \
    "$RUNS/work/stages.json" 2>/dev/null
  ls -la "$out"
  ;;
*)
  echo "usage: fashion_mnist_guided_gpu.sh start BUDGET_S [flags] | finish SECONDS" >&2
  exit 2
  ;;
esac
