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

# What to expect (8 videos, 300 steps): each objective's window loss at the last step is below its
# value at step 50 (the end of the lr warm-up); HiCo's pair accuracy rises from ~0.5 to ~0.7.
# Negatives never include the query's own video (the banks store each key's video id), and the
# key encoders use the papers' EMA momentum 0.999 (see configs/tiny_cpu.yaml and the demo loss
# curves in benchmarks/RESULTS.md). benchmarks/pretrain_sanity.py measures what the backbone
# learns (clip -> video retrieval, random init vs this run). Every logged term is in
# run/logs/metrics.jsonl.
python - "$DEMO_DIR/run/logs/metrics.jsonl" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "window/loss" in r]
keys = ["window/loss", "mcl/loss", "mcl/nce", "mcl/mal", "hico/loss", "hico/visual", "hico/topical", "hico/topical_acc"]
for r in (rows[0], rows[len(rows) // 2], rows[-1]) if rows else ():
    print(f"   step {r['step']:4d}  " + "  ".join(f"{k}={r[k]:.3f}" for k in keys if k in r))
at50 = next((r for r in rows if r["step"] >= 50), None)
if at50 is not None and rows[-1] is not at50:
    for k in ("window/loss", "mcl/loss", "hico/loss"):
        if k in at50 and k in rows[-1]:
            a, b = at50[k], rows[-1][k]
            print(f"   {k}: step {at50['step']} {a:.3f} -> step {rows[-1]['step']} {b:.3f} "
                  f"({'lower' if b < a else 'NOT lower'})")
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
