#!/usr/bin/env bash
# Create .venv and install fedpeft with its test tools. The CPU build of torch is installed
# first, so that no multi-GB CUDA build is pulled in on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${FEDPEFT_TORCH_VERSION:-2.13.0}" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[dev]"
