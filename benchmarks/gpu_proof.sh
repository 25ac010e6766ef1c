#!/usr/bin/env bash
# `make gpu-proof`: the production step on one GPU (step, memory, decode, kernels, ablation), each
# stage's JSON under --out as soon as it ends, one table; without a GPU every stage at toy size on
# the CPU (it says so, exit 0). Options go to benchmarks/gpu_proof.py (--out DIR, --only, --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_proof.py "$@"
