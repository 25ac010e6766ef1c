#!/usr/bin/env bash
# `make bench`: every benchmark, each printing candidate vs baseline side by side.
# Results with their commands are recorded in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

echo "== kernels: chunked bank NCE vs naive logits (and correlation impls)"
"$PY" benchmarks/kernels.py --corr

echo "== loader: this pipeline vs decode-whole-video-then-slice, 1 and 10 min videos"
"$PY" benchmarks/loader.py --batches 8 --naive-batches 2

echo "== pretraining sanity: clip -> video retrieval, random init vs the tiny pretrained backbone"
"$PY" benchmarks/pretrain_sanity.py --videos 8

echo "== MCL motion-crop scale: area distribution, old smallest-first rule vs the official rule"
"$PY" benchmarks/crop_area.py

echo "== motion maps: DIS vs Farneback vs TV-L1 on real clips"
# TV-L1 lives in opencv-contrib-python, which replaces opencv-python's cv2 module: it gets its own venv.
TVL1_VENV=${TVL1_VENV:-.cache/bench-tvl1-venv}
if [ ! -x "$TVL1_VENV/bin/python" ]; then
  python3 -m venv "$TVL1_VENV"
  "$TVL1_VENV/bin/pip" install -q opencv-contrib-python numpy "av>=18,<20" 2>&1 | grep -v "is ignored" || true
fi
PYTHONPATH="$PWD" "$TVL1_VENV/bin/python" benchmarks/motion_maps.py --max-frames 150
