"""`mohico eval CKPT --train SHARDS --val SHARDS [--config CONFIG] [--k 20] ...`: kNN top-1/top-5
accuracy of a pretrained backbone's pooled embeddings on labelled shards.

CKPT is a run directory (its latest checkpoint), a checkpoint folder, a backbone file written by
`mohico export --format mohico`, a zero_to_fp32 output, or `random` (the config's backbone at random init: the baseline).
The config (default: CKPT/config.yaml of a run directory) gives the backbone and the clip
geometry (data.clip_len, data.frame_stride, data.crop_size, data.mean/std). Labels are the shard
json's `label` field (`mohico shards SRC OUT --labels LABELS.json`). Each video: the mean of the
L2-normalised embeddings of N deterministic centre clips (centre crop, no augmentation); each
val video is classified by the exp(cos/T)-weighted vote of its k nearest train videos
(InstDisc / solo-learn). The same shards may be both sets: a video never votes for itself.
"""
from __future__ import annotations

HELP = "kNN top-1/top-5 accuracy of a pretrained backbone on labelled shards"
DESCRIPTION = __doc__


def add_arguments(p):
    p.add_argument("ckpt", metavar="RUN_DIR_OR_CKPT",
                   help="run directory, checkpoint folder, exported mohico backbone file, or 'random'")
    p.add_argument("--config", default=None,
                   help="experiment YAML (default: RUN_DIR/config.yaml when CKPT is a run directory)")
    p.add_argument("--train", required=True, metavar="SHARDS", help="labelled train shards (folder, pattern, list)")
    p.add_argument("--val", required=True, metavar="SHARDS", help="labelled val shards (may be the train shards)")
    p.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos/T) (default 0.07)")
    p.add_argument("--clips-per-video", type=int, default=1, metavar="N",
                   help="centre clips of N equal segments, embeddings averaged (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default=None, metavar="results.json", help="write the results (with per-video predictions)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="config override, repeatable, e.g. --set data.clip_len=8 --set data.crop_size=64")


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from mohico.config import load_config
    from mohico.errors import UsageError
    from mohico.trainer.knn_eval import knn_eval, load_eval_backbone, write_results

    if args.k < 1 or args.clips_per_video < 1 or args.batch_size < 1 or args.temperature <= 0:
        raise UsageError("--k, --clips-per-video and --batch-size must be >= 1 and --temperature > 0")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"--set takes key=value, got {bad}")
    config = args.config
    if config is None:
        run_cfg = Path(args.ckpt) / "config.yaml"
        if not run_cfg.is_file():
            raise UsageError(f"--config is required: {args.ckpt} is not a run directory with config.yaml")
        config = run_cfg
    cfg = load_config(config, list(args.overrides))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_eval_backbone(args.ckpt, cfg, config)
    res = knn_eval(backbone, cfg, args.train, args.val, k=args.k, temperature=args.temperature,
                   clips_per_video=args.clips_per_video, batch_size=args.batch_size, device=device)
    res = {"checkpoint": str(args.ckpt), "config": str(config), "train": str(args.train), "val": str(args.val), **res}
    print(f"kNN (k={res['k']}, T={res['temperature']}, {res['clips_per_video']} clip(s)/video) on "
          f"{res['num_val']} val / {res['num_train']} train videos, {res['num_classes']} classes: "
          f"top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
          f"(majority-class top-1 {100 * res['chance_top1']:.2f}%)")
    if args.out:
        print(f"results: {write_results(res, args.out)}")
    else:
        print(json.dumps({k: v for k, v in res.items() if k != "per_video"}))
    return 0
