#!/usr/bin/env bash
# Create .venv/ at the repository root and install prompt2prompt with its CLI, web, batch, bench and test extras.
# torch is pinned first so that a CPU machine never pulls a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cli,web,batch,bench,test]"
echo "prompt2prompt is installed in .venv/"
