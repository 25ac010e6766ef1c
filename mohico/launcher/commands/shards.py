"""`mohico shards`: untrimmed videos -> WebDataset tar shards with motion maps, DALI index files and a manifest."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mohico.datasets.write import shard_defaults as S
from mohico.errors import MohicoError, UsageError
from mohico.utils import atomic_write_text

HELP = "write videos as WebDataset shards (canonical re-encode + motion maps + DALI index + manifest)"
DESCRIPTION = (
    "Turn a folder (recursively) or a text file list of videos, in any container/codec FFmpeg reads, into "
    "WebDataset tar shards: per video a canonical constant-frame-rate re-encode ({key}.webm or .mp4), its "
    "metadata ({key}.json) and per-frame motion-boundary maps ({key}.motion.npy). Writes shard-NNNNNN.tar, "
    "a DALI index shard-NNNNNN.idx for each (for DALI's fn.readers.webdataset index_paths; mohico's own loader "
    "streams the tars and does not need them), and manifest.json (counts, hours, skipped inputs with reasons). "
    "Re-running the same command after an interruption resumes where it stopped.")


def add_arguments(p):
    p.add_argument("src", help="folder of videos (searched recursively; .json files are ignored) or a text file with one path per line")
    p.add_argument("out", help="output folder for shards, index files and manifest.json")
    p.add_argument("--codec", choices=["vp9", "h264"], default=S.DEFAULT_CODEC,
                   help="vp9 (.webm; decodes on DALI's CPU and GPU decoders, default) or h264 (.mp4; DALI GPU only)")
    p.add_argument("--short-side", type=int, default=S.DEFAULT_SHORT_SIDE,
                   help=f"short side of the stored frames in pixels (even; default {S.DEFAULT_SHORT_SIDE})")
    p.add_argument("--fps", type=int, default=S.DEFAULT_FPS, help=f"constant output frame rate (default {S.DEFAULT_FPS})")
    p.add_argument("--gop", type=int, default=S.DEFAULT_GOP, help=f"a keyframe at least every N frames (default {S.DEFAULT_GOP})")
    p.add_argument("--max-shard-size", default=S.DEFAULT_MAX_SHARD_SIZE,
                   help=f"close a shard before it grows past this (e.g. 1GB, 500MB; default {S.DEFAULT_MAX_SHARD_SIZE})")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: number of CPU cores)")
    p.add_argument("--flow", choices=["dis", "dis-fast", "farneback", "tvl1"], default=S.DEFAULT_FLOW,
                   help="optical flow for the motion maps: dis (DIS medium preset, default), dis-fast (DIS fast "
                        "preset, ~4x faster, less accurate on fast motion), farneback, tvl1 (the paper's; very slow; "
                        "needs opencv-contrib-python instead of opencv-python)")
    p.add_argument("--labels", default=None, help="labels file: JSON {source: label} or lines 'source<TAB>label'")
    p.add_argument("--min-frames", type=int, default=S.DEFAULT_MIN_FRAMES,
                   help=f"skip videos with fewer output frames than this (default {S.DEFAULT_MIN_FRAMES})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("benchmark layouts (labelled train/test shards per official split)")
    g.add_argument("--layout", choices=["ucf101", "hmdb51"], default=None,
                   help="SRC is the UCF101 (UCF-101/<Class>/v_*.avi) or HMDB51 (<class>/*.avi) video folder: writes "
                        "OUT/splitN/train and OUT/splitN/test, labelled with the class names, plus OUT/splitN/labels.json")
    g.add_argument("--splits", default=None, metavar="DIR",
                   help="the split files: UCF101's ucfTrainTestlist (classInd.txt, trainlist0N.txt, testlist0N.txt) or "
                        "HMDB51's testTrainMulti_7030_splits (<class>_test_splitN.txt)")
    g.add_argument("--split", default="1", metavar="N[,N]", help="which official splits (1, 2, 3; default 1)")


def run(args) -> int:
    from mohico.datasets.write.shards import parse_size, write_shards

    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.layout is not None:
        return _run_layout(args, workers)
    if args.splits is not None:
        raise UsageError("--splits needs --layout ucf101 or --layout hmdb51")
    man = write_shards(args.src, args.out, codec=args.codec, short_side=args.short_side, fps=args.fps, gop=args.gop,
                       max_shard_size=parse_size(args.max_shard_size), workers=workers, flow=args.flow,
                       progress=not args.quiet, labels=args.labels, min_frames=args.min_frames)
    _summary(man, args.out)
    _check_written(man, args.src, args.out)
    return 0


def _check_written(man: dict, src, out) -> None:
    """No video written (every input skipped, or none found): a MohicoError (exit 1), not a
    successful run that leaves shards nobody can train on."""
    if man["num_samples"]:
        return
    n = man["inputs"]["count"]
    if n == 0:
        raise MohicoError(f"no video written: {src} holds no input files (a folder of videos, searched "
                          f"recursively, or a text file listing them)")
    raise MohicoError(f"no video written: all {n} inputs of {src} were skipped (reasons above and in "
                      f"{Path(out) / 'manifest.json'}); fix or replace them (or lower --min-frames if they are "
                      f"too short) and run again")


def _summary(man: dict, out) -> None:
    print(f"mohico shards: {man['num_samples']} videos ({man['total_frames']} frames, {man['total_hours']:.3f} h) "
          f"in {man['num_shards']} shards in {out}; skipped {man['num_skipped']} of {man['inputs']['count']} inputs"
          + (" (reasons in manifest.json)" if man["num_skipped"] else ""))
    for s in man["skipped"][:10]:
        print(f"  skipped {s['source']}: {s['reason']}")
    if man["num_skipped"] > 10:
        print(f"  ... and {man['num_skipped'] - 10} more")


def _run_layout(args, workers: int) -> int:
    from mohico.datasets.write.benchmark_layouts import split_inputs
    from mohico.datasets.write.shards import parse_size, write_shards

    if args.splits is None:
        raise UsageError(f"--layout {args.layout} needs --splits DIR (the official split files)")
    if args.labels is not None:
        raise UsageError("--layout labels the videos with their class names; drop --labels")
    try:
        splits = sorted({int(x) for x in args.split.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--split takes 1, 2, 3 or a list like 1,2,3; got {args.split!r}") from None
    for n in splits:
        sp = split_inputs(args.layout, args.src, args.splits, n)
        folder = Path(args.out) / f"split{n}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "labels.json", json.dumps(sp.labels, indent=1, sort_keys=True) + "\n")
        atomic_write_text(folder / "classes.txt", "".join(f"{c}\n" for c in sp.classes))
        print(f"{args.layout} split {n}: {len(sp.train)} train, {len(sp.test)} test videos, {len(sp.classes)} classes"
              + (f"; {len(sp.missing)} listed videos not found under {args.src} (e.g. {sp.missing[0]})"
                 if sp.missing else ""))
        for part, inputs in (("train", sp.train), ("test", sp.test)):
            if not inputs:
                raise UsageError(f"{args.layout} split {n}: no {part} video found under {args.src}")
            man = write_shards(inputs, folder / part, codec=args.codec, short_side=args.short_side, fps=args.fps,
                               gop=args.gop, max_shard_size=parse_size(args.max_shard_size), workers=workers,
                               flow=args.flow, progress=not args.quiet, labels=sp.labels, min_frames=args.min_frames)
            _summary(man, folder / part)
            _check_written(man, args.src, folder / part)
    return 0
