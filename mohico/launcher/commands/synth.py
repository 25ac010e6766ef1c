"""`mohico synth`: synthetic untrimmed videos with ground truth (the project's demo and test data)."""
from __future__ import annotations

import argparse
import time

HELP = "synthesise untrimmed videos (shots, cuts, moving objects, camera pans) with ground truth"
DESCRIPTION = """\
Synthesise untrimmed videos with known ground truth (the demo and test data).

Each video has a topic (background palettes/textures and object kinds shared by its shots) and
several shots separated by hard cuts; a shot is a textured background with sensor noise, an
optional camera pan and 0-3 textured objects bouncing around; motion level 0 shots are nearly static.
OUT gets video_NNNNN.webm (vp9) or .mp4 (h264), video_NNNNN.json (topic, shots with motion level
and pan, per-frame object boxes [id, x, y, w, h] and camera translation) and labels.json
({video: topic}, usable as `mohico shards --labels`). Same seed, same bytes.

With --layout ucf101 or hmdb51, OUT gets a small benchmark tree with the real layout, file names
and split files instead (UCF-101/<Class>/v_<Class>_gGG_cCC.avi + ucfTrainTestlist/, or
hmdb51/<class>/*.avi + testTrainMulti_7030_splits/): --topics classes, --videos per class, a class
being a topic; `mohico shards --layout` reads it like the real datasets.

--task motion writes the motion benchmark instead: each video's label is how its objects move
(horizontal, vertical, circular, zoom, or camera pan over a still scene); each video is one random
scene (background) with new random objects (shape, pattern, palette, size) at every cut, all drawn
independently of the label, a speed and amplitude of its own kept across its shots, and still
stretches around each shot's motion. labels.json maps each video to its class name.
--motion-style shot draws a new speed and amplitude at every cut instead, so that two clips of a
video from different shots share only the scene and the motion class."""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 160x120, got {text!r}") from None
    if w < 32 or h < 32 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"size must be even and at least 32x32, got {text!r}")
    return w, h


def add_arguments(p):
    p.add_argument("out", help="output folder: one video + one <name>.json ground truth per video")
    p.add_argument("--task", choices=["scenes", "motion"], default="scenes",
                   help="scenes (topic videos, default) or motion (label = how objects move; appearance random)")
    p.add_argument("--motion-style", choices=["video", "shot"], default="video",
                   help="--task motion: one motion style (speed, amplitude, pan direction) per video, kept across "
                        "its shots (default), or a new one at every cut")
    p.add_argument("--videos", type=int, default=4, help="how many videos (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same videos")
    p.add_argument("--first", type=int, default=0,
                   help="index of the first video (default 0): --first 200 --videos 100 makes videos 200-299 of the "
                        "seed, disjoint from --videos 200 (a test split of the same dataset)")
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9",
                   help="vp9 (.webm, decodes on DALI's CPU and GPU decoders) or h264 (.mp4, GPU only)")
    p.add_argument("--fps", type=int, default=15, help="frames per second (default 15)")
    p.add_argument("--size", type=_size, default=(160, 120), help="WxH (default 160x120)")
    p.add_argument("--duration", type=float, default=12.0, help="seconds per video (default 12)")
    p.add_argument("--topics", type=int, default=4, help="number of topics (default 4)")
    p.add_argument("--layout", choices=["ucf101", "hmdb51"], default=None,
                   help="write a small UCF101 or HMDB51 tree (real layout and split files; --videos per class)")
    p.add_argument("--workers", type=int, default=1,
                   help="render videos in this many processes (default 1; same bytes either way)")


def run(args) -> int:
    from mohico.datasets.synthetic.synth import synthesize

    t0 = time.perf_counter()
    if args.layout is not None:
        from mohico.datasets.synthetic.benchmark_synth import synth_benchmark

        res = synth_benchmark(args.out, args.layout, classes=args.topics, per_class=args.videos, seed=args.seed,
                              fps=args.fps, size=args.size, duration=args.duration)
        print(f"mohico synth: wrote a {args.layout} tree of {res['num_videos']} videos ({args.topics} classes) to "
              f"{res['videos']} with split files in {res['splits']} in {time.perf_counter() - t0:.1f} s")
        return 0
    # synthesize() validates every argument and raises UsageError (exit 2) naming the flag.
    paths = synthesize(args.out, videos=args.videos, seed=args.seed, codec=args.codec, fps=args.fps,
                       size=args.size, duration=args.duration, topics=args.topics, workers=args.workers,
                       task=args.task, first=args.first, motion_style=args.motion_style)
    w, h = args.size
    print(f"mohico synth: wrote {len(paths)} {args.codec} videos ({w}x{h}, {args.fps} fps, "
          f"{args.duration:g} s, {args.topics if args.task == 'scenes' else 'motion'} "
          f"{'topics' if args.task == 'scenes' else 'classes'}) with ground truth JSON to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
