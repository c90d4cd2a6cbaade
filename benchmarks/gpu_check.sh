#!/usr/bin/env bash
# Short prepared GPU check (< 5 minutes): CUDA vs CPU engine on random inputs,
# then 20-step ELS sample timings at N=10,000 and N=60,000. Run from a checkout
# on a machine with a CUDA GPU, in an environment with a CUDA build of torch and
# patchmosaic installed (PYTHON picks the interpreter; default .venv/bin/python):
#   PYTHON=python3 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import patchmosaic, torch" || { echo "install torch (CUDA build) and patchmosaic for $PY first" >&2; exit 2; }
timeout 300 "$PY" benchmarks/gpu_check.py
