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

echo "== 1/4 synthesising 8 untrimmed videos into $DEMO_DIR/videos"
mohico synth "$DEMO_DIR/videos" --videos 8 --seed 0 --duration 10 --size 160x120 --fps 15

echo "== 2/4 writing WebDataset shards with motion maps into $DEMO_DIR/shards"
mohico shards "$DEMO_DIR/videos" "$DEMO_DIR/shards" --short-side 112 --fps 15 --gop 16 \
  --max-shard-size 2MB --workers 2 --labels "$DEMO_DIR/videos/labels.json"

echo "== 3/4 pretraining configs/tiny_cpu.yaml (MCL + HiCo, 2 CPU ranks) into $DEMO_DIR/run"
mohico train configs/tiny_cpu.yaml --nproc 2 run.dir="$DEMO_DIR/run" data.shards="$DEMO_DIR/shards" \
  checkpoint.resume=never

# What to expect (8 videos, 300 steps): both contrastive losses fall in the first ~150 steps
# (MCL's NCE to ~2.4-3.2, HiCo's visual NT-Xent to ~2.5; chance is ~5.6) and climb back while the
# cosine schedule takes the lr to 0 (with a constant lr they stay down). With 8 videos the banks
# hold ~30 keys of each query's own video: while the encoder moves, those stale keys are easy
# negatives; once it stops they are false negatives as hard as the positive. Measured on the
# checkpoints: at a constant lr, mean q.bank is -0.15 vs 0.4 to fresh keys. The backbone does
# learn: benchmarks/pretrain_sanity.py measures clip -> video retrieval and embedding spread,
# random init vs this run (benchmarks/RESULTS.md). HiCo's pair accuracy rises from ~0.6 to ~0.78.
# Every logged term is in run/logs/metrics.jsonl.
python - "$DEMO_DIR/run/logs/metrics.jsonl" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "window/loss" in r]
keys = ["window/loss", "mcl/nce", "mcl/mal", "hico/visual", "hico/topical", "hico/topical_acc"]
for r in (rows[0], rows[len(rows) // 2], rows[-1]) if rows else ():
    print(f"   step {r['step']:4d}  " + "  ".join(f"{k}={r[k]:.3f}" for k in keys if k in r))
print("   (the losses climb back while the lr decays to 0 on this 8-video set: see scripts/demo.sh)")
PY

echo "== 4/4 exporting the pretrained backbone to $DEMO_DIR/backbone.pt"
# The tiny config's backbone is 8 channels wide, which torchvision's r3d_18 cannot hold: the
# mohico format keeps the builder's name and options. Full-width backbones export with
# --format torchvision (the default) for torchvision.models.video.* with strict=True.
mohico export "$DEMO_DIR/run" "$DEMO_DIR/backbone.pt" --format mohico

echo
echo "demo finished in $((SECONDS - t0)) s"
echo "  videos + ground truth : $DEMO_DIR/videos"
echo "  shards + manifest     : $DEMO_DIR/shards/manifest.json"
echo "  checkpoints           : $DEMO_DIR/run/checkpoints (latest: $(cat "$DEMO_DIR/run/checkpoints/latest" 2>/dev/null || echo '?'))"
echo "  resolved config       : $DEMO_DIR/run/config.yaml"
echo "  W&B offline run       : $(ls -d "$DEMO_DIR"/run/wandb/offline-run-* 2>/dev/null | tail -n 1 || echo '?')"
echo "  exported backbone     : $DEMO_DIR/backbone.pt"
echo "  train metrics         : $DEMO_DIR/run/logs/metrics.jsonl (every logged term)"
echo "  kNN probe             : mohico eval $DEMO_DIR/run --train $DEMO_DIR/shards --val $DEMO_DIR/shards --k 1"
echo "                          (topics are colour palettes: a random-init backbone already separates them)"
