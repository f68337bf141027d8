#!/usr/bin/env bash
# Wall time of the main job from a fresh clone: `bash bin/demo.sh` twice in a temporary
# `git clone` of this repository (the committed HEAD). The first run includes the venv
# install (pip's wheel cache is reused, as on any machine that installed before; the
# FID weight cache and the reference-statistics cache in ~/.cache/keras_progdist are
# reused unless KERAS_PROGDIST_CACHE points elsewhere); the second must be a no-op: no
# training, no re-export, every score read back. Every log line is timestamped, and
# each piece's seconds are parsed from the log and from runs/tiny/stages.json.
#
# Writes benchmarks/results/demo_walltime.json (and the two logs beside it as
# demo_walltime_run{1,2}.log) with both times, the pieces, whether the second run was a
# no-op, and the load average sampled every 10 s (1-minute figure: min, mean, max), since
# on a busy machine the times are not the idle machine's.
#
# Usage: bash benchmarks/demo_walltime.sh [extra flags for bin/demo.sh]
#   KEEP=1 keeps the clone (its path is printed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/benchmarks/results"
mkdir -p "$OUT"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/kpd_demo_walltime.XXXXXX")"
cleanup() {
  if [ -n "${SAMPLER_PID:-}" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" != "1" ]; then rm -rf "$TMP"; else echo "kept $TMP" >&2; fi
}
trap cleanup EXIT
git clone -q "$ROOT" "$TMP/repo"
COMMIT="$(git -C "$TMP/repo" rev-parse HEAD)"

# 1-minute load average every 10 s while the runs go.
( while true; do printf '%s %s\n' "$EPOCHREALTIME" "$(cut -d' ' -f1 /proc/loadavg)"; sleep 10; done ) \
  > "$TMP/load.txt" &
SAMPLER_PID=$!

run_demo() {  # $1: log file. Each line: seconds since the run started, then the line.
  local start=$EPOCHREALTIME rc=0
  ( cd "$TMP/repo" && bash bin/demo.sh "${@:2}" 2>&1 ) | while IFS= read -r line; do
    printf '%.2f %s\n' "$(echo "$EPOCHREALTIME - $start" | bc)" "$line"
  done > "$1" || rc=$?
  printf '%.2f [walltime] exit %s\n' "$(echo "$EPOCHREALTIME - $start" | bc)" "$rc" >> "$1"
}

echo "[walltime] run 1 (install + everything) in $TMP/repo" >&2
run_demo "$TMP/run1.log" "$@"
echo "[walltime] run 2 (should do nothing)" >&2
run_demo "$TMP/run2.log" "$@"
# The digit-classifier scores of the teacher, the 4-step student and 4-step DDIM
# (read back when the main job's evaluation already wrote them), timed on their own.
echo "[walltime] digit scores" >&2
DIGITS_START=$EPOCHREALTIME
( cd "$TMP/repo" && .venv/bin/python bin/digits.py \
    --gin_file=tiny.gin --workdir=runs/tiny ) > "$TMP/digits.log" 2>&1 || true
echo "$EPOCHREALTIME - $DIGITS_START" | bc > "$TMP/digits_s.txt"
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=

cp "$TMP/run1.log" "$OUT/demo_walltime_run1.log"
cp "$TMP/run2.log" "$OUT/demo_walltime_run2.log"
cp "$TMP/digits.log" "$OUT/demo_walltime_digits.log"
python3 - "$TMP" "$OUT/demo_walltime.json" "$COMMIT" <<'EOF'
import json, os, platform, re, sys

tmp, out, commit = sys.argv[1:4]


def read(path):
    lines = []
    with open(path, errors="replace") as f:
        for raw in f:
            t, _, text = raw.rstrip("\n").partition(" ")
            try:
                lines.append((float(t), text))
            except ValueError:
                continue
    return lines


def first(lines, pattern):
    return next((t for t, s in lines if re.search(pattern, s)), None)


def last(lines, pattern):
    return next((t for t, s in reversed(lines) if re.search(pattern, s)), None)


def pieces(lines):
    end = lines[-1][0]
    t_run = first(lines, r"^\[run\]")
    t_student = first(lines, r"^\[stage\] student_")
    t_export_last = last(lines, r"^\[export\]")
    # The last stage line ends training; export prints only after each model is done.
    distill_end = last(lines, r"^\[stage\] ")
    r = lambda x: None if x is None else round(x, 1)
    sub = lambda a, b: None if a is None or b is None else round(a - b, 1)
    return {
        "total_s": r(end),
        "setup_and_import_s": r(t_run),
        "teacher_wall_s": sub(t_student, t_run),
        "distill_wall_s": sub(distill_end, t_student),
        "export_wall_s": sub(t_export_last, distill_end),
        "eval_wall_s": sub(end, t_export_last),
        "exit": next((s.split()[-1] for _, s in reversed(lines) if "[walltime] exit" in s),
                     None),
    }


run1, run2 = read(os.path.join(tmp, "run1.log")), read(os.path.join(tmp, "run2.log"))
stages = []
path = os.path.join(tmp, "repo", "runs", "tiny", "stages.json")
if os.path.exists(path):
    with open(path) as f:
        text = f.read().strip()
    try:
        stages = json.loads(text)
    except ValueError:
        stages = [json.loads(l) for l in text.splitlines() if l.strip()]
text2 = [s for _, s in run2]
no_op = {
    "trained_nothing": not any(re.search(r"Epoch \d+/|\] step \d+/|resuming", s) for s in text2),
    "stages_skipped": sum("finished earlier, skipping" in s for s in text2),
    "exported_nothing": all("nothing written" in s for s in text2 if s.startswith("[export]")
                            and re.search(r"\[export\] (teacher|student)", s)),
    "scores_read_back": all("saved earlier" in s for s in text2
                            if re.search(r"^\[eval\] \w+ \d+ steps:", s)),
}
load = []
with open(os.path.join(tmp, "load.txt")) as f:
    load = [float(l.split()[1]) for l in f if len(l.split()) == 2]
digits = os.path.join(tmp, "repo", "runs", "tiny", "eval", "digits.json")
record = {
    "benchmark": "demo_walltime",
    "command": "bash bin/demo.sh (fresh git clone; run 1 installs the venv)",
    "commit": commit,
    "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
    "load_avg_1m": {"min": min(load, default=None),
                    "mean": round(sum(load) / len(load), 2) if load else None,
                    "max": max(load, default=None), "samples": len(load)},
    "run1": pieces(run1),
    "run2": {**pieces(run2), "no_op": no_op},
    "stages_json": [{k: s.get(k) for k in ("stage", "num_steps", "updates", "seconds")}
                    for s in stages],
}
if os.path.exists(digits):
    with open(digits) as f:
        record["digits"] = json.load(f)
    with open(os.path.join(tmp, "digits_s.txt")) as f:
        record["digits"]["wall_s"] = round(float(f.read()), 1)
with open(out, "w") as f:
    json.dump(record, f, indent=1)
print(json.dumps(record, indent=1))
EOF
