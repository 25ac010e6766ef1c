"""`mohico eval [PROTOCOL] CKPT --train SHARDS --val SHARDS [--config CONFIG] ...`: evaluate a
pretrained backbone on labelled shards. PROTOCOL is `knn` (default), `retrieval`, `linear` or `finetune`.

CKPT is a run directory (its latest checkpoint), a checkpoint folder, a backbone file written by
`mohico export --format mohico`, a zero_to_fp32 output, or `random` (the config's backbone at random init: the baseline).
The config (default: CKPT/config.yaml of a run directory) gives the backbone and the clip
geometry (data.clip_len, data.frame_stride at data.reference_fps, data.crop_size, data.mean/std). Labels are the shard
json's `label` field (`mohico shards SRC OUT --labels LABELS.json`) or, overriding them, `--labels FILE`.
Each video gives N temporal clips (centred in equal segments) x M spatial crops of the short side,
embedded by the frozen backbone and L2-normalised (no augmentation); features can be cached (`--cache DIR`).
- knn (kNN): each val video is classified by the exp(cos/T)-weighted vote of its k nearest train videos (InstDisc / solo-learn);
  top-5 counts only classes that got a vote (k=1: top-5 = top-1), ties to the lower class index.
- retrieval (CoCLR's protocol): each set's video features minus that set's own mean, L2-normalised; val videos query
  train videos by cosine similarity; recall@k = a video of the query's class in the top k. --no-center: plain cosine.
- linear: a linear classifier on the frozen features of every train view, lr / weight decay picked on a held-out
  part of train, top-1/top-5 on val from the softmax averaged over a video's views.
- finetune: the backbone plus a new head trained end to end on the --train shards by `mohico train` with the
  config (e.g. configs/finetune_ucf101.yaml; its run.dir, resumable, DeepSpeed, W&B), then multi-clip test
  accuracy on --val (finetune.test_clips x finetune.test_crops views, softmax averaged) in RUN_DIR/finetune_test.json.
The same shards may be both sets for knn and retrieval: a video never matches itself.
BN statistics: the backbone's running ones (default), or with --precise-bn N re-estimated on N batches of the
train views first (PySlowFast's precise BN; every backbone, random init included, normalised by the same data).
Results: a table on stdout, JSON (--out), and W&B (the pretraining run's when CKPT is a run, else a new run).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mohico.errors import UsageError

HELP = "evaluate a backbone on labelled shards: knn (default), retrieval, linear or finetune"
DESCRIPTION = __doc__
PROTOCOLS = ("knn", "retrieval", "linear", "finetune")


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.usage = "mohico eval [-h] [PROTOCOL] CKPT --train SHARDS --val SHARDS [options]"
    p.add_argument("target", nargs="+", metavar="[PROTOCOL] CKPT [key=value ...]",
                   help=f"optional protocol ({', '.join(PROTOCOLS)}; default knn), then a run directory, checkpoint "
                        "folder, exported backbone file, torchvision state_dict, or 'random'")
    p.add_argument("--config", default=None,
                   help="experiment YAML (default: RUN_DIR/config.yaml when CKPT is a run directory)")
    p.add_argument("--train", required=True, metavar="SHARDS", help="labelled train shards (folder, pattern, list)")
    p.add_argument("--val", "--test", dest="val", required=True, metavar="SHARDS",
                   help="labelled val/test shards (may be the train shards for knn and retrieval)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="labels for both sets, overriding the shards': JSON {source: label} or 'source<TAB>label' lines")
    p.add_argument("--clips-per-video", type=int, default=None, metavar="N",
                   help="temporal clips per video (centres of N equal segments; default 1, linear 3)")
    p.add_argument("--spatial-crops", type=int, default=None, metavar="M",
                   help="crops of the short side along the long side (1 centre, 3 left/centre/right; default 1, linear 3)")
    p.add_argument("--cache", default=None, metavar="DIR", help="cache extracted features here (reused when unchanged)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (default 16)")
    p.add_argument("--precise-bn", type=int, default=0, metavar="BATCHES",
                   help="re-estimate the BN statistics on this many batches of the train views before embedding "
                        "(PySlowFast's precise BN, e.g. 200; default 0: the backbone's running statistics)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default=None, metavar="results.json", help="write the results (with per-video predictions)")
    p.add_argument("--no-wandb", action="store_true", help="do not log the results to W&B")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="config override, repeatable, e.g. --set data.clip_len=8 --set data.crop_size=64; "
                        "positional key=value (as for train) works too: mohico eval CKPT data.clip_len=8 ...")
    g = p.add_argument_group("knn")
    g.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    g.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos/T) (default 0.07)")
    g = p.add_argument_group("retrieval")
    g.add_argument("--recall-at", default="1,5,10,20,50", metavar="K,K,...", help="recall@k (default 1,5,10,20,50)")
    g.add_argument("--no-center", dest="center", action="store_false",
                   help="do not centre each set's features by its own mean before the cosine (default: centre, "
                        "CoCLR's protocol 'coclr-centred'; with this flag 'uncentred')")
    g = p.add_argument_group("linear")
    g.add_argument("--lr", default="0.01,0.1,1", metavar="LR,...", help="learning rates searched (default 0.01,0.1,1)")
    g.add_argument("--wd", default="0,1e-3,1e-2,1e-1", metavar="WD,...",
                   help="weight decays searched (default 0,1e-3,1e-2,1e-1)")
    g.add_argument("--epochs", type=int, default=100, help="SGD epochs over the train views (default 100)")
    g.add_argument("--linear-batch-size", type=int, default=256, help="SGD batch size (default 256)")
    g.add_argument("--folds", type=int, default=5,
                   help="cross-validation folds of train for the search (default 5; 1: one held-out part, "
                        "--val-fraction; the search fits folds x grid probes)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="with --folds 1: held-out part of train (default 0.2)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split and SGD order (default 0)")
    g = p.add_argument_group("finetune (the rest comes from --config: finetune.*, optim.*, trainer.*, run.dir)")
    g.add_argument("--nproc", type=int, default=None, help="local ranks (default: trainer.nproc)")


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def take_positional_overrides(args) -> None:
    """``key=value`` items among the positionals (``mohico eval CKPT data.clip_len=8``) join
    ``--set``'s overrides, as train's and submit's do."""
    from mohico.launcher.cli import is_override

    args.overrides = list(args.overrides) + [t for t in args.target if is_override(t)]
    args.target = [t for t in args.target if not is_override(t)]


def parse_target(target: list[str]) -> tuple[str, str]:
    """``[PROTOCOL] CKPT`` -> ``(protocol, ckpt)``."""
    if len(target) == 1:
        return "knn", target[0]
    if len(target) == 2 and target[0] in PROTOCOLS:
        return target[0], target[1]
    raise UsageError(f"expected [PROTOCOL] CKPT with PROTOCOL one of {', '.join(PROTOCOLS)}; got {' '.join(target)}")


def headline(res: dict) -> str:
    """One line with the protocol's main numbers."""
    n = f"{res['num_test']} val / {res['num_train']} train videos, {res['num_classes']} classes, " \
        f"{res['clips_per_video']} clip(s) x {res['spatial_crops']} crop(s)"
    if res["protocol"] == "retrieval":
        recalls = "  ".join(f"R@{k} {100 * res[f'recall@{k}']:.2f}%" for k in res["ks"])
        return f"retrieval ({res['retrieval_protocol']}) on {n}: {recalls}"
    what = (f"kNN (k={res['k']}, T={res['temperature']})" if res["protocol"] == "knn"
            else f"linear (lr={res['lr']:g}, wd={res['weight_decay']:g})")
    return (f"{what} on {n}: top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
            f"(majority-class top-1 {100 * res['chance_top1']:.2f}%)")


def run(args) -> int:
    import torch

    from mohico.config import load_config
    from mohico.datasets.write.shards_inputs import load_labels
    from mohico.eval.protocols import run_protocol
    from mohico.eval.report import log_wandb, results_table, write_results
    from mohico.eval.knn import load_eval_backbone

    take_positional_overrides(args)
    protocol, ckpt = parse_target(args.target)
    if protocol == "finetune":
        return run_finetune(args, ckpt)
    linear = protocol == "linear"
    clips = args.clips_per_video if args.clips_per_video is not None else (3 if linear else 1)
    crops = args.spatial_crops if args.spatial_crops is not None else (3 if linear else 1)
    if args.k < 1 or clips < 1 or crops < 1 or args.batch_size < 1 or args.temperature <= 0:
        raise UsageError("--k, --clips-per-video, --spatial-crops and --batch-size must be >= 1 and --temperature > 0")
    if args.precise_bn < 0 or (args.precise_bn and args.batch_size < 2):
        raise UsageError("--precise-bn takes a number of batches >= 0, and batches of --batch-size >= 2 clips")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"--set takes key=value, got {bad}")
    options: dict = {}
    if protocol == "knn":
        options = {"k": args.k, "temperature": args.temperature}
    elif protocol == "retrieval":
        ks = [int(k) for k in _floats(args.recall_at, "--recall-at")]
        if not ks or min(ks) < 1:
            raise UsageError(f"--recall-at needs ks >= 1, got {args.recall_at!r}")
        options = {"ks": ks, "center": args.center}
    else:
        if args.epochs < 1 or args.linear_batch_size < 1 or args.folds < 1 or not 0 < args.val_fraction < 1:
            raise UsageError("--epochs, --linear-batch-size and --folds must be >= 1 and 0 < --val-fraction < 1")
        options = {"lrs": _floats(args.lr, "--lr"), "weight_decays": _floats(args.wd, "--wd"), "epochs": args.epochs,
                   "batch_size": args.linear_batch_size, "folds": args.folds, "val_fraction": args.val_fraction,
                   "seed": args.seed}
    config = args.config
    if config is None:
        run_cfg = Path(ckpt) / "config.yaml"
        if not run_cfg.is_file():
            raise UsageError(f"--config is required: {ckpt} is not a run directory with config.yaml")
        config = run_cfg
    cfg = load_config(config, list(args.overrides))
    labels = load_labels(args.labels) if args.labels else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_eval_backbone(ckpt, cfg, config)
    res = run_protocol(protocol, backbone, cfg, args.train, args.val, options, labels=labels, clips_per_video=clips,
                       spatial_crops=crops, cache_dir=args.cache, batch_size=args.batch_size, device=device,
                       progress=not args.quiet, precise_bn_batches=args.precise_bn)
    res = {"protocol": protocol, "checkpoint": str(ckpt), "config": str(config), "train": str(args.train),
           "val": str(args.val), "labels": args.labels, **res}
    if protocol == "knn":
        res["num_val"] = res["num_test"]
    print(results_table(res))
    print(headline(res))
    if args.out:
        print(f"results: {write_results(res, args.out)}")
    if not args.no_wandb:
        from mohico.trainer.wandb_log import run_opener

        run_id = log_wandb(res, ckpt, args.out, run_opener(cfg))
        if run_id:
            print(f"W&B run {run_id}: eval/{protocol}/*")
    return 0


def run_finetune(args, ckpt: str) -> int:
    """`mohico eval finetune`: `mohico train CONFIG finetune.backbone=CKPT data.shards=TRAIN
    finetune.test_shards=VAL [finetune.labels=FILE] [--set ...]` (which tests at the end)."""
    from mohico.config import load_config
    from mohico.launcher.commands import train as train_cmd

    if args.config is None:
        raise UsageError("eval finetune needs --config (e.g. configs/finetune_ucf101.yaml, or configs/finetune_tiny_cpu.yaml)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"--set takes key=value, got {bad}")
    overrides = [f"finetune.backbone={ckpt}", f"data.shards={args.train}", f"finetune.test_shards={args.val}"]
    if args.labels:
        overrides.append(f"finetune.labels={args.labels}")
    overrides += list(args.overrides)
    cfg = load_config(args.config, overrides)
    if Path(ckpt).is_dir() and Path(cfg.run.dir).resolve() in (Path(ckpt).resolve(), *Path(ckpt).resolve().parents):
        raise UsageError(f"run.dir {cfg.run.dir} is the pretraining run {ckpt}: give the fine-tuning run its own "
                         f"folder (--set run.dir=runs/finetune_x)")
    ns = argparse.Namespace(config=args.config, overrides=overrides, nproc=args.nproc, _parser=None)
    code = train_cmd.run(ns)
    result = Path(cfg.run.dir) / "finetune_test.json"
    if code == 0 and args.out and result.is_file():
        from mohico.eval.report import write_results

        print(f"results: {write_results(json.loads(result.read_text()), args.out)}")
    return code
