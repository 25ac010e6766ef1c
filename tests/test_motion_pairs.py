"""benchmarks/motion_pairs.py: the shares of same-clip, overlapping and same-shot MCL pairs, on
videos whose cuts and motion are known (pure numpy, no shards)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mohico.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pair_stats_on_known_videos(benchmark_script):
    m = benchmark_script("motion_pairs")
    cfg = load_config(ROOT / "configs" / "motion_bench_cpu.yaml")
    n = 120                                                   # 8 s at 15 fps; clips span 8 frames (stride 1)
    tm = np.zeros(n)
    tm[20:50] = tm[70:100] = 1.0                              # motion in each half, one shot each
    metas = [{"num_frames": n, "fps": 15.0, "width": 128, "height": 128, "tmotion": tm.tolist(), "cuts": []}] * 4
    truths = [{"cuts": [60]}] * 4                             # one cut, exactly at the middle
    halves = m.pair_stats(metas, truths, cfg, "halves", 50)
    assert halves["same_clip"] == halves["overlapping"] == halves["same_shot"] == 0.0   # different halves = shots
    assert halves["mean_distance_s"] >= 8 / 15
    pool = m.pair_stats(metas, truths, cfg, "pool", 50)
    assert pool["overlapping"] > 0 and pool["same_shot"] > 0.3     # one pool: often the same shot
    assert pool["pairs"] == halves["pairs"] == 200
