#!/usr/bin/env bash
# `make demo`: synthesise a small untrimmed-video dataset, write it as shards, pretrain the tiny
# CPU config on it, and say where everything is. Runs inside the project venv (Makefile sets PATH).
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export WANDB_MODE=${WANDB_MODE:-offline}
export WANDB_SILENT=true
mkdir -p "$DEMO_DIR"
t0=$SECONDS

echo "== 1/3 synthesising 8 untrimmed videos into $DEMO_DIR/videos"
mohico synth "$DEMO_DIR/videos" --videos 8 --seed 0 --duration 10 --size 160x120 --fps 15

echo "== 2/3 writing WebDataset shards with motion maps into $DEMO_DIR/shards"
mohico shards "$DEMO_DIR/videos" "$DEMO_DIR/shards" --short-side 112 --fps 15 --gop 16 \
  --max-shard-size 2MB --workers 2

echo "== 3/3 pretraining configs/tiny_cpu.yaml (MCL + HiCo, 2 CPU ranks) into $DEMO_DIR/run"
mohico train configs/tiny_cpu.yaml --nproc 2 run.dir="$DEMO_DIR/run" data.shards="$DEMO_DIR/shards" \
  checkpoint.resume=never

echo
echo "demo finished in $((SECONDS - t0)) s"
echo "  videos + ground truth : $DEMO_DIR/videos"
echo "  shards + manifest     : $DEMO_DIR/shards/manifest.json"
echo "  checkpoints           : $DEMO_DIR/run/checkpoints (latest: $(cat "$DEMO_DIR/run/checkpoints/latest" 2>/dev/null || echo '?'))"
echo "  resolved config       : $DEMO_DIR/run/config.yaml"
echo "  W&B offline run       : $(ls -d "$DEMO_DIR"/run/wandb/offline-run-* 2>/dev/null | tail -n 1 || echo '?')"
echo "  export the backbone   : mohico export $DEMO_DIR/run backbone.pt --format torchvision"
