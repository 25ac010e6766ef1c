#!/usr/bin/env bash
# `make gpu-check`: every GPU path in one command (DALI mixed decode, Triton kernels, NCCL + bf16
# ZeRO-1 training killed and resumed bitwise), one table; exit 1 on any failure, 0 without a GPU.
# Options go to benchmarks/gpu_check.py (--work DIR, --skip dali,bank,correlation,pretrain).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
