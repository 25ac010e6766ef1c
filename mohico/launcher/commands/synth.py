"""`mohico synth`: synthetic untrimmed videos with ground truth (the project's demo and test data)."""
from __future__ import annotations

HELP = "synthesise untrimmed videos (shots, cuts, moving objects, camera pans) with ground truth"


def _size(text: str) -> tuple[int, int]:
    import argparse

    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 160x120, got {text!r}") from None
    if w < 32 or h < 32 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"size must be even and at least 32x32, got {text!r}")
    return w, h


def add_arguments(p):
    p.add_argument("out", help="output folder: one video + one <name>.json ground truth per video")
    p.add_argument("--videos", type=int, default=4, help="how many videos (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same videos")
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9",
                   help="vp9 (.webm, decodes on DALI's CPU and GPU decoders) or h264 (.mp4, GPU only)")
    p.add_argument("--fps", type=int, default=15, help="frames per second (default 15)")
    p.add_argument("--size", type=_size, default=(160, 120), help="WxH (default 160x120)")
    p.add_argument("--duration", type=float, default=12.0, help="seconds per video (default 12)")
    p.add_argument("--topics", type=int, default=4, help="number of topics (default 4)")


def run(args) -> int:
    from mohico.datasets.synth import synthesize
    from mohico.errors import UsageError

    if args.videos < 1:
        raise UsageError("--videos must be >= 1")
    if args.duration <= 0 or args.fps <= 0:
        raise UsageError("--duration and --fps must be > 0")
    paths = synthesize(args.out, videos=args.videos, seed=args.seed, codec=args.codec, fps=args.fps,
                       size=args.size, duration=args.duration, topics=args.topics)
    print(f"mohico synth: wrote {len(paths)} videos with ground truth to {args.out}")
    return 0
