"""MCL's two spatial crop rules on the motion benchmark's train videos (``sampling.crop_rule``).

For every train video of an ablation work dir (``benchmarks/motion_ablation.py``: its shards),
``--draws`` draws of :class:`ClipSampler` (MCL alone, the config's clips, the halves temporal draw)
per rule, and per view: whether the crop was a motion crop or fell back to a plain random resized
crop, its area (a fraction of the motion map), and how much of the moving region it holds (the share
of the area of the S-motion cells above the 90th percentile inside the box: the percentile rule's own
target, the same yardstick for both). For the official rule also how the top-4-cell box of the
7 x 7 grid splits over the coverage bands (<= 4 / 8 / 12 cells; above 12: a random crop).

    .venv/bin/python benchmarks/crop_rules.py [--work /tmp/mohico-motion-v2] [--train-videos 200] [--draws 4]
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def shard_samples(shards: Path) -> list[tuple[dict, np.ndarray]]:
    """``(meta, motion maps)`` of every video in ``shards`` (tar order)."""
    out = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            files: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tf.extractfile(m).read()
        out += [(json.loads(f["json"]), np.load(io.BytesIO(f["motion.npy"]))) for f in files.values()]
    return out


def rule_stats(videos: list[tuple[dict, np.ndarray]], cfg, rule: str, draws: int) -> dict:
    """Per-view crop statistics of ``rule`` over ``draws`` draws of every video."""
    from mohico.datasets.load.crops import box_coverage, hot_mask, pool_grid, top_cell_box
    from mohico.datasets.load.sampling import ClipSampler, sample_rng

    cfg.sampling.crop_rule = rule
    sampler = ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False)
    random, areas, held, cells = [], [], [], []
    for i, (meta, motion) in enumerate(videos):
        for r in range(draws):
            d = sampler.sample(meta, motion, sample_rng(0, r, 0, f"video{i}"))
            for v in range(len(d.starts)):
                s = motion[np.minimum(d.frames[v], motion.shape[0] - 1)].astype(np.float64).mean(axis=0)
                box = np.asarray(d.map_boxes[v])
                random.append(d.crop_methods[v] == "random")
                areas.append(box[2] * box[3] / s.size)
                hot = hot_mask(s, 90.0)
                if hot.any():
                    held.append(float(box_coverage(hot, box)))
                if s.max() > s.min():
                    (_, _, w, h), _ = top_cell_box(pool_grid(s))
                    cells.append(w * h)
    held_a, cells_a = np.array(held), np.array(cells)
    return {"views": len(random), "random_crops": float(np.mean(random)), "area_mean": float(np.mean(areas)),
            "area_median": float(np.median(areas)), "held_mean": float(held_a.mean()),
            "held_0.8": float((held_a >= 0.8).mean()),
            "cells": [float((cells_a <= 4).mean()), float(((cells_a > 4) & (cells_a <= 8)).mean()),
                      float(((cells_a > 8) & (cells_a <= 12)).mean()), float((cells_a > 12).mean())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mohico-motion-v2")
    ap.add_argument("--train-videos", type=int, default=200)
    ap.add_argument("--draws", type=int, default=4, help="draws per video and rule")
    args = ap.parse_args()
    from mohico.config import load_config

    shards = Path(args.work) / f"shards-train-{args.train_videos}"
    if not shards.is_dir():
        raise SystemExit(f"{shards}: no such shards; run benchmarks/motion_ablation.py --work {args.work} first")
    videos = shard_samples(shards)
    grid = "x".join(str(n) for n in videos[0][1].shape[1:])
    print(f"{len(videos)} videos, motion grid {grid}, {args.draws} draws each (%):")
    print("| rule | views | random crops | area mean | area median | moving area held (mean) | held >= 0.8 |"
          " top-4 box <= 4 / <= 8 / <= 12 / > 12 cells |")
    print("|---|---|---|---|---|---|---|---|")
    for rule in ("percentile", "official"):
        cfg = load_config(ROOT / "configs" / "motion_bench_cpu.yaml", ["sampling.mcl_temporal=halves"])
        r = rule_stats(videos, cfg, rule, args.draws)
        bands = " / ".join(f"{100 * c:.1f}" for c in r["cells"])
        print(f"| {rule} | {r['views']} | {100 * r['random_crops']:.1f} | {100 * r['area_mean']:.1f} | "
              f"{100 * r['area_median']:.1f} | {100 * r['held_mean']:.1f} | {100 * r['held_0.8']:.1f} | {bands} |")


if __name__ == "__main__":
    main()
