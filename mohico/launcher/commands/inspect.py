"""`mohico inspect`: a picture of one shard sample (frames, their motion maps, the T-motion curve)
and, with ``--config``, the clips, crop boxes and flips the training sampler draws for it."""
from __future__ import annotations

from mohico.errors import UsageError

HELP = ("draw one shard sample: a row of frames, a row of their motion maps and the T-motion curve; "
        "with --config also the training sampler's clips, crop boxes and flips for it")


def add_arguments(p):
    p.add_argument("shard", help="a shard tar written by `mohico shards`")
    p.add_argument("--key", default=None, help="sample key (default: the shard's first sample)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--frames", type=int, default=8,
                   help="how many evenly spaced frames to show without --config (default 8)")
    p.add_argument("--config", default=None,
                   help="experiment YAML: run the training sampler on the sample and draw each view's clip "
                        "span, crop box (M: motion-focused, R: random fallback) and flip")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides (with --config), e.g. --set sampling.motion_prob=1.0 data.clip_len=8; "
                        "positional key=value after the shard (as for train) works too")
    p.add_argument("--progress", type=float, default=None,
                   help="training progress in [0, 1] the loader would report (HiCo's delta_max; default 0, "
                        "the start of training); needs --config")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the config's trainer.seed); "
                                                           "needs --config")
    p.add_argument("--epoch", type=int, default=None, help="loader epoch, from 0 (default 0); needs --config")
    p.add_argument("--rank", type=int, default=None,
                   help="the rank whose loader reads the sample (default 0); needs --config")


def run(args) -> int:
    from mohico.datasets.inspect.inspect_sample import read_sample, render_sample

    if args.frames < 1:
        raise UsageError("--frames must be >= 1")
    sampler_opts = {"--progress": args.progress, "--seed": args.seed, "--epoch": args.epoch, "--rank": args.rank,
                    "--set": args.overrides or None}
    given = [k for k, v in sampler_opts.items() if v is not None]
    if args.config is None:
        if given:
            raise UsageError(f"{', '.join(given)}: these options drive the training sampler, which needs --config CONFIG "
                             "(e.g. --config configs/base.yaml)")
        img = render_sample(args.shard, key=args.key, out=args.out, num_frames=args.frames)
        print(f"mohico inspect: wrote {args.out} ({img.shape[1]}x{img.shape[0]})")
        return 0
    if args.progress is not None and not 0.0 <= args.progress <= 1.0:
        raise UsageError(f"--progress must be in [0, 1], got {args.progress}")
    for name in ("epoch", "rank"):
        if (getattr(args, name) or 0) < 0:
            raise UsageError(f"--{name} must be >= 0")

    from mohico.config import load_config
    from mohico.datasets.inspect.inspect_overlays import draw_sample, notes_for, overlays_for

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"trainer.seed={args.seed}")
    cfg = load_config(args.config, overrides)
    sample = read_sample(args.shard, args.key)
    d = draw_sample(cfg, args.shard, sample, progress=args.progress or 0.0, epoch=args.epoch or 0,
                    rank=args.rank or 0)
    overlays = overlays_for(d)
    img = render_sample(args.shard, out=args.out, overlays=overlays, sample=sample,
                        notes=notes_for(d, float(sample["meta"]["fps"])))
    print(f"mohico inspect: wrote {args.out} ({img.shape[1]}x{img.shape[0]})")
    for ov in overlays:
        fr = ov["frames"]
        print(f"  {ov['label']}: frames {fr[0]}..{fr[-1]} step {fr[1] - fr[0] if len(fr) > 1 else 0}, "
              f"box (x, y, w, h) = {ov['box']} px")
    return 0
