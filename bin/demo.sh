#!/usr/bin/env bash
# The main job on the embedded data: set up, then teacher -> 4 distillation stages
# (16 -> 1 steps) -> SavedModel/.keras export -> FID/KID report, on 2 CPU cores.
# Re-running resumes; finished stages are skipped. Extra flags go to bin/run.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/bin/setup_env.sh" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/python" bin/run.py --gin_file=tiny.gin --workdir=runs/tiny --verbose=2 "$@"
