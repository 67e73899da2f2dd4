#!/usr/bin/env bash
# Create .venv and install everything OFLSAM2Slicer needs, in the only safe order:
# torch pinned first (never let pip resolve it), then sam2 without its CUDA build,
# then the project with its test extra. Safe to run again: finished steps are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation sam2==1.1.0
"${PIP[@]}" install -e '.[test,bench]'
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
