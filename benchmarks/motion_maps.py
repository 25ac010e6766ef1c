"""Motion-map throughput and agreement: DIS (and Farneback) against TV-L1, side by side in one run.

For each real clip (cockatoo.mp4, bikes.mp4; fetched and cached by mohico.datasets.sample_clips) the frames are
brought to the shard form (CFR 15 fps, short side N) once, then every flow method computes the
motion maps of mohico.datasets.write.motion (flow -> motion boundaries -> 8x8 block means) on one
thread. Reported per method:

- throughput: frames/s on one core (cv2.setNumThreads(1)), and the speed-up over TV-L1;
- agreement with TV-L1's maps: Pearson correlation of all pooled cells of the clip, and the mean
  per-frame correlation;
- crop-box IoU with TV-L1's (a row "tvl1 +-10% noise" calibrates both metrics: TV-L1's own maps
  with +-10% multiplicative noise; motion_crop_box's IoU is low even there, since it takes the first
  of random draws that reaches the coverage, so a small change of the hot cells picks another box): clips of 16 frames at stride 2 (every 8th start); each clip's
  S-motion (mean map) gives a box (a) by the simple rule "bounding box of the cells at or above
  the 90th percentile" and (b) by mohico.datasets.load.sampling.motion_crop_box (MCL's crop, the same
  random draws for both methods); IoU of the two methods' boxes, averaged over clips.

TV-L1 lives in opencv-contrib-python, which must not share a venv with opencv-python (same cv2
module). Run in a separate venv:

    python3 -m venv /tmp/mohico-tvl1
    /tmp/mohico-tvl1/bin/pip install opencv-contrib-python numpy "av>=18,<20"
    PYTHONPATH=/work/main /tmp/mohico-tvl1/bin/python benchmarks/motion_maps.py

Without cv2.optflow it runs DIS/Farneback only and says so. Goal: DIS >= 20x TV-L1's speed with
crop-box IoU >= 0.7.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shard_frames(path: Path, short_side: int, fps: int, max_frames: int) -> list[np.ndarray]:
    from mohico.datasets.write.transcode import transcode

    frames: list[np.ndarray] = []
    transcode(path, "vp9", short_side, fps, 16, on_frame=lambda g: frames.append(g) if len(frames) < max_frames else None)
    return frames[:max_frames]


def run_method(method: str, frames) -> tuple[np.ndarray, float]:
    from mohico.datasets.write.motion import MotionMapper

    mm = MotionMapper(method)
    t0 = time.perf_counter()
    for g in frames:
        mm.push(g)
    maps, _ = mm.finish()
    return maps, len(frames) / (time.perf_counter() - t0)


def corr(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def percentile_box(s: np.ndarray, q: float = 90.0):
    ys, xs = np.nonzero(s >= np.percentile(s, q))
    return (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())


def iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def box_ious(maps_a, maps_b, clip_len=16, stride=2, step=8, seeds=5):
    from mohico.datasets.load.sampling import motion_crop_box

    span = (clip_len - 1) * stride + 1
    simple, mcl = [], []
    for s0 in range(0, maps_a.shape[0] - span + 1, step):
        idx = np.arange(s0, s0 + span, stride)
        sa, sb = maps_a[idx].mean(0), maps_b[idx].mean(0)
        if sa.max() <= 0 or sb.max() <= 0:
            continue
        simple.append(iou(percentile_box(sa), percentile_box(sb)))
        for seed in range(seeds):
            ba, _ = motion_crop_box(sa, rng=np.random.default_rng(seed))
            bb, _ = motion_crop_box(sb, rng=np.random.default_rng(seed))
            mcl.append(iou(ba, bb))
    return float(np.mean(simple)), float(np.mean(mcl)), len(simple)


def main() -> int:
    import cv2

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", nargs="*", default=["cockatoo.mp4", "bikes.mp4"])
    ap.add_argument("--short-side", type=int, default=128)
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--max-frames", type=int, default=96, help="frames per clip (TV-L1 is slow)")
    ap.add_argument("--methods", nargs="*", default=["dis", "dis-fast", "farneback", "tvl1"])
    args = ap.parse_args()
    cv2.setNumThreads(1)
    from mohico.datasets.sample_clips import fetch_clip

    have_tvl1 = hasattr(cv2, "optflow")
    methods = [m for m in args.methods if m != "tvl1" or have_tvl1]
    print(f"# cv2 {cv2.__version__} ({'contrib: TV-L1 available' if have_tvl1 else 'no cv2.optflow: TV-L1 skipped'}), "
          f"numpy {np.__version__}, 1 thread, short side {args.short_side}, {args.fps} fps, {os.cpu_count()} cores")
    ref = "tvl1" if "tvl1" in methods else methods[-1]
    rows = []
    for name in args.clips:
        frames = shard_frames(fetch_clip(name), args.short_side, args.fps, args.max_frames)
        h, w = frames[0].shape
        res = {m: run_method(m, frames) for m in methods}
        for m in methods:
            maps, fps_m = res[m]
            c_all = corr(maps, res[ref][0])
            c_frame = float(np.nanmean([corr(a, b) for a, b in zip(maps, res[ref][0])]))
            simple, mcl, n = box_ious(maps, res[ref][0])
            rows.append((name, f"{w}x{h}", len(frames), m, fps_m, fps_m / res[ref][1], c_all, c_frame, simple, mcl, n))
        # calibration of the metrics: the reference's own maps with +-10% multiplicative noise
        noisy = res[ref][0] * np.random.default_rng(0).uniform(0.9, 1.1, res[ref][0].shape)
        simple, mcl, n = box_ious(noisy, res[ref][0])
        rows.append((name, f"{w}x{h}", len(frames), f"{ref} +-10% noise", float("nan"), float("nan"),
                     corr(noisy, res[ref][0]), float(np.nanmean([corr(a, b) for a, b in zip(noisy, res[ref][0])])),
                     simple, mcl, n))
    print(f"| clip | size | frames | method | frames/s/core | x {ref} | corr (all cells) | corr (per frame) "
          f"| box IoU p90 rule | box IoU motion_crop_box | clips |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.3f} | {r[7]:.3f} | {r[8]:.3f} | {r[9]:.3f} | {r[10]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
