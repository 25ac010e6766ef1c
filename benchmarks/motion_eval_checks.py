"""How do the evaluation's own choices move the motion-benchmark scores? (issue 13 item 5)

The ablation (``benchmarks/motion_ablation.py``) scores each backbone with a cosine kNN on its raw
clip features, the online backbone, its running BN statistics and the last checkpoint. Each check
here changes one of those choices for the runs of an ablation work dir, so that a gap between
arms can be told apart from a property of the protocol. They read the ablation's own eval clips
and saved features; none retrains anything.

    knn-norm   the ablation's kNN (cosine, k 20, T 0.07, :func:`mohico.eval.protocols.knn`)
               on the saved video features as they are (``raw``), centred on the train videos'
               mean (``centred``) and standardised per dimension by the train videos' mean and
               std (``standardised``) before the L2 normalisation; mean +- sample std per arm.
    backbone   kNN, recall@1 and recall@5 (``--linear``: and the linear probe) after embedding the eval clips again with
               the online backbone on its running BN statistics (``running``: the ablation's), with BN
               statistics re-estimated on every train eval clip (``precise``: mohico.eval.features.precise_bn,
               PySlowFast's precise BN, as `mohico eval --precise-bn`), and with the checkpoint's EMA
               key backbone (``ema``); the random init has no EMA. A run dir holding a backbone file
               (the sanity arm's ``backbone.pt``) is read at the ablation config's geometry.
    curve      kNN and recall@1 (``--linear``: and the 5-fold linear probe) of every checkpoint
               kept in one run dir: does the encoder get better or worse along the way? Train
               with ``--set checkpoint.every_steps=N --set checkpoint.keep=K`` to keep them.

    .venv/bin/python benchmarks/motion_eval_checks.py knn-norm [--work /tmp/mohico-motion-v2] [--test-videos 500]
    .venv/bin/python benchmarks/motion_eval_checks.py backbone --runs random-s0 mcl-s0 [--modes running precise ema] [--linear]
    .venv/bin/python benchmarks/motion_eval_checks.py curve --runs mcl-s0 [--linear]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from motion_ablation import CONFIG, eval_clips, features_name, saved_feature_sets  # noqa: E402  (the ablation's clips, config, files)

NORMS = ("raw", "centred", "standardised")
MODES = ("running", "precise", "ema")


def normalised(train: np.ndarray, test: np.ndarray, norm: str) -> dict[str, np.ndarray]:
    """``train: (N, D)``, ``test: (M, D)`` shifted (``centred``) or also scaled per dimension
    (``standardised``) by the train rows' statistics, in float64; ``raw`` as they are."""
    if norm == "raw":
        return {"train": train, "test": test}
    tr, te = train.astype(np.float64), test.astype(np.float64)
    mu = tr.mean(0)
    sd = tr.std(0) + 1e-8 if norm == "standardised" else 1.0
    return {"train": ((tr - mu) / sd).astype(np.float32), "test": ((te - mu) / sd).astype(np.float32)}


def run_knn_norm(work: Path, test_videos: int) -> dict:
    from mohico.eval import protocols as ep

    rows: dict[tuple[str, str], list[float]] = {}
    paths = sorted((work / "runs").glob(f"*/{features_name(test_videos)}"))
    if not paths:
        raise SystemExit(f"{work}/runs: no {features_name(test_videos)}; run benchmarks/motion_ablation.py "
                         f"--work {work} --test-videos {test_videos} first")
    for path in paths:
        arm = path.parent.name.rsplit("-s", 1)[0]
        saved = np.load(path)
        for norm in NORMS:
            tr, te = saved_feature_sets(saved, normalised(saved["train"], saved["test"], norm))
            rows.setdefault((arm, norm), []).append(100 * ep.knn(tr, te)["top1"])
    arms = sorted({a for a, _ in rows})
    print("arm | seeds | " + " | ".join(f"kNN top-1, {n} features" for n in NORMS), flush=True)
    out = {}
    for arm in arms:
        cells = []
        for norm in NORMS:
            v = rows[(arm, norm)]
            out[f"{arm}/{norm}"] = v
            cells.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}")
        print(f"{arm} | {len(rows[(arm, NORMS[0])])} | " + " | ".join(cells), flush=True)
    return out


def run_dir_backbone(run: Path, cfg_overrides: list[str]):
    """``(cfg, config path, last checkpoint or "random")`` of an ablation run dir (``random-sN``: the
    seed's init, built from the ablation's config plus ``cfg_overrides``; the sanity arm's dir holds
    a backbone file, ``backbone.pt``, trained at the ablation config's geometry)."""
    from mohico.config import load_config

    arm, seed = run.name.rsplit("-s", 1)
    if arm == "random":
        return load_config(CONFIG, [f"trainer.seed={seed}", *cfg_overrides]), CONFIG, "random"
    if (run / "backbone.pt").is_file() and not (run / "checkpoints").is_dir():
        return load_config(CONFIG, [f"trainer.seed={seed}", *cfg_overrides]), CONFIG, run / "backbone.pt"
    steps = sorted((run / "checkpoints").glob("step_*"))
    if not steps:
        raise SystemExit(f"{run}/checkpoints: no step_* checkpoint; train it with benchmarks/motion_ablation.py first")
    return load_config(run / "config.yaml", []), run / "config.yaml", steps[-1]


def ema_backbone(backbone: torch.nn.Module, ckpt: Path) -> None:
    """Load the checkpoint's EMA key backbone (``key_encoder.backbone.*``) into ``backbone``."""
    from mohico.checkpoint_read import load_module_state

    module, _ = load_module_state(ckpt)
    prefix = "key_encoder.backbone."
    ema = {k[len(prefix):]: v for k, v in module.items() if k.startswith(prefix)}
    if not ema:
        raise SystemExit(f"{ckpt}: the checkpoint holds no {prefix}* weights (a run without a key encoder)")
    backbone.load_state_dict(ema, strict=True)


def run_and_clips(work: Path, name: str, args) -> tuple:
    """``(cfg, config path, last checkpoint or "random", [train videos, test videos])``: run dir
    ``name`` of ``work`` and the ablation's eval clips at that run's geometry."""
    cfg, config, ckpt = run_dir_backbone(work / "runs" / name, args.set)
    videos = [eval_clips(work / f"shards-{s}-{n}", cfg, args.clips)
              for s, n in (("train", args.train_videos), ("test", args.test_videos))]
    return cfg, config, ckpt, videos


def score(backbone, train_videos, test_videos, linear: bool, seed: int) -> dict[str, float]:
    from mohico.eval import protocols as ep
    from mohico.eval.features import embed_views

    cpu = torch.device("cpu")
    tr = embed_views(backbone, train_videos, cpu).labelled("train eval clips")
    te = embed_views(backbone, test_videos, cpu).labelled("test eval clips")
    recall = ep.retrieval(tr, te)
    out = {"knn": 100 * ep.knn(tr, te)["top1"], "recall@1": 100 * recall["recall@1"], "recall@5": 100 * recall["recall@5"]}
    if linear:
        out["linear"] = 100 * ep.linear(tr, te, seed=seed)["top1"]
    return out


def run_backbone(work: Path, args) -> dict:
    from mohico.eval.features import precise_bn
    from mohico.eval.knn import load_eval_backbone

    res = {}
    for name in args.runs:
        cfg, config, ckpt, videos = run_and_clips(work, name, args)
        for mode in args.modes:
            if mode == "ema" and ckpt == "random":
                continue
            backbone = load_eval_backbone(str(ckpt), cfg, config)
            if mode == "precise":
                precise_bn(backbone, (c for v in videos[0] for c in v.clips), torch.device("cpu"))   # every train clip
            elif mode == "ema":
                ema_backbone(backbone, ckpt)
            res[f"{name}/{mode}"] = r = score(backbone, *videos, args.linear, int(name.rsplit("-s", 1)[1]))
            print(f"{name} | {mode} | " + " | ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    return res


def run_curve(work: Path, args) -> dict:
    from mohico.eval.knn import load_eval_backbone

    res = {}
    for name in args.runs:
        cfg, config, _, videos = run_and_clips(work, name, args)
        for ckpt in sorted((work / "runs" / name / "checkpoints").glob("step_*")):
            step = int(ckpt.name.split("_")[1])
            r = score(load_eval_backbone(str(ckpt), cfg, config), *videos, args.linear, int(name.rsplit("-s", 1)[1]))
            res[f"{name}/{step}"] = r
            print(f"{name} | step {step} | " + " | ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("knn-norm", "backbone", "curve"))
    ap.add_argument("--work", default="/tmp/mohico-motion-v2")
    ap.add_argument("--train-videos", type=int, default=200)
    ap.add_argument("--test-videos", type=int, default=500)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--runs", nargs="*", default=["random-s0", "mcl-s0"], help="backbone / curve: run dir names")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="backbone: what to vary")
    ap.add_argument("--linear", action="store_true", help="backbone, curve: the 5-fold linear probe too (slower)")
    ap.add_argument("--set", action="append", default=[], metavar="key=value", help="the random init's config")
    ap.add_argument("--out", default="", help="write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    if args.what == "knn-norm":
        res = run_knn_norm(work, args.test_videos)
    elif args.what == "backbone":
        res = run_backbone(work, args)
    else:
        res = run_curve(work, args)
    if args.out:
        from mohico.utils import atomic_write_json

        atomic_write_json(args.out, {"args": vars(args), "result": res})


if __name__ == "__main__":
    main()
