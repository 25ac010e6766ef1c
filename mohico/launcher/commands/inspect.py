"""`mohico inspect`: a picture of one shard sample (frames, their motion maps, the T-motion curve)."""
from __future__ import annotations

HELP = "draw one shard sample: a row of frames, a row of their motion maps and the T-motion curve"


def add_arguments(p):
    p.add_argument("shard", help="a shard tar written by `mohico shards`")
    p.add_argument("--key", default=None, help="sample key (default: the shard's first sample)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--frames", type=int, default=8, help="how many evenly spaced frames to show (default 8)")


def run(args) -> int:
    from mohico.datasets.inspect_sample import render_sample
    from mohico.errors import UsageError

    if args.frames < 1:
        raise UsageError("--frames must be >= 1")
    img = render_sample(args.shard, key=args.key, out=args.out, num_frames=args.frames)
    print(f"mohico inspect: wrote {args.out} ({img.shape[1]}x{img.shape[0]})")
    return 0
