"""Why does the motion-benchmark ablation sit at chance? Cheap diagnostics (issue 13 item 5).

Each works on the deterministic eval clips of ``benchmarks/motion_ablation.py`` (the clips every
backbone of the ablation is evaluated on, ``--clips`` per video, decoded once and cached beside
the shards; ``--set data.crop_size=64`` etc. decode them at another geometry) and takes a few
minutes on one core:

    upper      (a) an upper bound: the same backbone trained *supervised* on the motion labels of
               the train clips for ``--steps`` steps of batch 8; test accuracy per clip and per video
               (mean of its clips' softmax). The backbone takes the config's input
               (``model.backbone_options.input``; residual frames in motion_bench_cpu.yaml);
               ``--input rgb`` forces RGB clips, ``--input diff`` feeds the T-1 frame differences
               to an RGB backbone (is the net able to use motion when it is handed to it?); ``--moving-only`` trains
               and tests on the clips > 70% in motion only (do the still stretches dilute it?).
    flow       (b) is the motion in the clips as the loader yields them? Farneback optical flow
               statistics of each clip (mean |u|, |v|, divergence, curl, global coherence ...)
               classified by kNN / nearest centroid, against colour statistics as the control.
    contrast   (d) can a contrastive loss find the labels at this batch and budget? The same backbone +
               MCL's projection MLP trained with SimCLR's NT-Xent (in-batch negatives, no bank, no
               EMA) on the eval clips: ``--pos instance`` pairs two clips of one video (what NCE
               sees), ``--pos class`` pairs clips of two videos of the same class (an oracle: the
               labels choose the positives, and the batch's other clips of that class are not
               negatives); the loss against chance (``ln(2B - 1)`` for instance) and the video
               kNN along the way, against the random init at step 0 (``motion_contrast.py``).
    features   (c) did pretraining move the backbone? For the random init and each ablation run's
               saved eval features (``RUN/features-test{N}.npz``): per-dimension std and effective rank of
               the L2-normalised clip embeddings, kNN on the motion label and on the appearance
               attributes the synth records (first object's pattern and shape in the clip's shot).

    .venv/bin/python benchmarks/motion_diagnostics.py upper [--steps 150] [--input config|rgb|diff] [--opt sgd|adamw]
        [--moving-only]
    .venv/bin/python benchmarks/motion_diagnostics.py flow
    .venv/bin/python benchmarks/motion_diagnostics.py contrast [--pos instance|class] [--steps 300] [--batch 8]
        [--opt sgd|adamw] [--tau 0.1]
    .venv/bin/python benchmarks/motion_diagnostics.py features [--runs nce-s0 mcl-s0 ...]

Common options: ``--work /tmp/mohico-motion-v2`` (the ablation's work dir: its shards, videos and
runs), ``--train-videos 200 --test-videos 500 --clips 4``, ``--set key=value`` (config override).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from motion_ablation import CONFIG, eval_clips, features_name  # noqa: E402  (the ablation's clips and config)
from motion_scores import knn_and_centroid  # noqa: E402
from motion_sanity import moving_fractions, optimiser, random_flip, step as opt_step  # noqa: E402


def clip_arrays(work: Path, args, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """``(x_train: (V, C, 3, T, S, S), y_train: (V,), x_test, y_test, classes)`` of the eval clips."""
    sets = []
    for split, n in (("train", args.train_videos), ("test", args.test_videos)):
        shards = work / f"shards-{split}-{n}"
        if not (shards / "manifest.json").exists():
            raise SystemExit(f"{shards}: no shards; run benchmarks/motion_ablation.py --work {work} first")
        sets.append(eval_clips(shards, cfg, args.clips))
    classes = sorted({v.label for v in sets[0]})
    out = []
    for videos in sets:
        out += [np.stack([v.clips for v in videos]), np.array([classes.index(v.label) for v in videos])]
    return (*out, classes)


def clip_moving(work: Path, args, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Share of each eval clip's frames in motion (the synth's ground truth ``moving``), at the
    stride the clips are decoded at (``motion_sanity.moving_fractions``; before 2026-12-06 it read
    ``data.frame_stride`` stored frames, 2, where the clips take 1 on 15-fps shards):
    ``(train (V, clips), test (V, clips))`` in [0, 1]."""
    out = []
    for split, n in (("train", args.train_videos), ("test", args.test_videos)):
        out.append(np.array([moving_fractions(json.loads((work / f"videos-{split}-{n}" / Path(v.source).with_suffix(
            ".json").name).read_text()), cfg.data, args.clips) for v in eval_clips(work / f"shards-{split}-{n}", cfg, args.clips)]))
    return out[0], out[1]


# --------------------------------------------------------------------------- (b) hand-crafted motion
def flow_stats(clip: np.ndarray, mean: float, std: float) -> np.ndarray:
    """20 motion statistics of one normalised clip ``(3, T, S, S)``: per frame pair, Farneback flow
    mean |u|, |v|, |mean u|, |mean v|, mean |div|, |curl|, |mean div|, |mean curl|, coherence
    |mean flow| / mean |flow|, mean |flow|; their mean and std over the clip's T-1 pairs."""
    import cv2

    gray = np.clip((clip.mean(0) * std + mean) * 255.0, 0, 255).astype(np.uint8)
    rows = []
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 7, 3, 5, 1.1, 0)
        u, v = flow[..., 0], flow[..., 1]
        du, dv = np.gradient(u), np.gradient(v)
        div, curl, mag = du[1] + dv[0], dv[1] - du[0], np.hypot(u, v)
        rows.append([np.abs(u).mean(), np.abs(v).mean(), abs(u.mean()), abs(v.mean()), np.abs(div).mean(),
                     np.abs(curl).mean(), abs(div.mean()), abs(curl.mean()),
                     np.hypot(u.mean(), v.mean()) / (mag.mean() + 1e-6), mag.mean()])
    rows = np.array(rows)
    return np.concatenate([rows.mean(0), rows.std(0)])


def colour_stats(clip: np.ndarray) -> np.ndarray:
    """The control: per-channel mean and std of the clip (appearance only)."""
    return np.concatenate([clip.mean((1, 2, 3)), clip.std((1, 2, 3))])


def run_flow(xtr, ytr, xte, yte, classes, cfg) -> dict:
    res = {}
    mean, std = float(np.mean(cfg.data.mean)), float(np.mean(cfg.data.std))
    for name, fn in (("flow", lambda c: flow_stats(c, mean, std)), ("colour", colour_stats)):
        ftr = np.stack([[fn(c) for c in v] for v in xtr])
        fte = np.stack([[fn(c) for c in v] for v in xte])
        mu, sd = ftr.reshape(-1, ftr.shape[-1]).mean(0), ftr.reshape(-1, ftr.shape[-1]).std(0) + 1e-9
        ztr, zte = (ftr - mu) / sd, (fte - mu) / sd
        video = knn_and_centroid(ztr.mean(1), ytr, zte.mean(1), yte, len(classes))
        clip = knn_and_centroid(ztr.reshape(-1, ztr.shape[-1]), np.repeat(ytr, ztr.shape[1]),
                                zte.reshape(-1, zte.shape[-1]), np.repeat(yte, zte.shape[1]), len(classes))
        res[name] = {"video_knn": video[0], "video_centroid": video[1], "clip_knn": clip[0], "clip_centroid": clip[1]}
        print(f"{name:>7}: video kNN {100 * video[0]:.1f}, centroid {100 * video[1]:.1f} | "
              f"clip kNN {100 * clip[0]:.1f}, centroid {100 * clip[1]:.1f}  (chance {100 / len(classes):.0f})",
              flush=True)
    return res


# --------------------------------------------------------------------------- (a) supervised upper bound
class FrameDiff(nn.Module):
    """``x: (B, 3, T, S, S) -> (B, 3, T-1, S, S)``: consecutive frame differences."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 1:] - x[:, :, :-1]


def run_upper(xtr, ytr, xte, yte, classes, cfg, args, moving=None) -> dict:
    """Train backbone + linear head supervised on the train clips (random clip, random flip, batch
    8, one-cycle lr); report the train loss and test accuracy 5 times along the way. ``moving``
    (``clip_moving``'s pair): train and test on the clips > 70% in motion only (the video score
    averages a video's moving clips; videos without one are left out)."""
    from mohico.models.backbones import build_backbone

    torch.manual_seed(args.seed)
    options = dict(cfg.model.backbone_options)
    if args.input != "config":   # rgb / diff: the backbone takes the clip (or FrameDiff's output) as is
        options.pop("input", None)
    backbone = build_backbone(cfg.model.backbone, **options)
    model = nn.Sequential(*([FrameDiff()] if args.input == "diff" else []), backbone,
                          nn.Linear(backbone.out_dim, len(classes)))
    opt, sched, lr = optimiser(model.parameters(), args.opt, args.steps, args.lr)
    x = torch.from_numpy(xtr.reshape(-1, *xtr.shape[2:]))
    y = torch.from_numpy(np.repeat(ytr, xtr.shape[1]))
    xt, yt = torch.from_numpy(xte), torch.from_numpy(yte)
    keep = torch.ones(xte.shape[:2], dtype=torch.bool)
    if moving is not None:
        sel = torch.from_numpy(moving[0].reshape(-1) > 0.7)
        x, y, keep = x[sel], y[sel], torch.from_numpy(moving[1] > 0.7)
        print(f"moving clips only: {len(x)} train, {int(keep.sum())} test", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    losses, curve, t0 = [], [], time.perf_counter()

    def test() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(xt[i:i + 16].flatten(0, 1)) for i in range(0, len(xt), 16)])
        model.train()
        logits = logits.view(len(xt), xt.shape[1], -1)
        clip = float((logits.argmax(-1) == yt[:, None])[keep].float().mean())
        vids = keep.any(1)
        prob = (logits.softmax(-1) * keep[..., None]).sum(1)
        return clip, float((prob.argmax(-1) == yt)[vids].float().mean())

    every = max(args.steps // 5, 1)
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (args.batch,), generator=gen)
        xb = random_flip(x[idx], gen)
        losses.append(opt_step(opt, sched, nn.functional.cross_entropy(model(xb), y[idx])))
        if step % every == 0 or step == args.steps:
            clip, video = test()
            curve.append({"step": step, "train_loss": float(np.mean(losses[-every:])), "test_clip_top1": clip,
                          "test_video_top1": video, "seconds": time.perf_counter() - t0})
            print(f"step {step}: train loss {curve[-1]['train_loss']:.3f}, test top-1 clip {100 * clip:.1f} "
                  f"video {100 * video:.1f} ({curve[-1]['seconds']:.0f} s)", flush=True)
    return {"curve": curve, "input": args.input, "opt": args.opt, "lr": lr, "steps": args.steps}


# --------------------------------------------------------------------------- (d) is the contrastive signal there?
# --------------------------------------------------------------------------- (c) what did pretraining learn?
def shot_attributes(sources: np.ndarray, folder: Path, cfg, clips: int) -> dict[str, np.ndarray]:
    """Per eval clip ``(V * clips,)``: the pattern and shape of the first object of the shot
    holding the clip's middle frame, and the video index (the objects change at every cut; the scene is one per video)."""
    from mohico.datasets.load.sampling import clip_frames
    from mohico.datasets.load.eval_clips import eval_starts

    out: dict[str, list] = {"pattern": [], "shape": [], "video": []}
    for i, src in enumerate(sources):
        gt = json.loads((folder / Path(str(src)).with_suffix(".json").name).read_text())
        for start in eval_starts(gt["num_frames"], cfg.data.clip_len, cfg.data.frame_stride, clips):
            mid = int(np.median(clip_frames(start, cfg.data.clip_len, cfg.data.frame_stride, gt["num_frames"])))
            shot = next(s for s in gt["shots"] if s["start"] <= mid < s["end"])
            out["pattern"].append(shot["objects"][0]["pattern"])
            out["shape"].append(shot["objects"][0]["kind"])
            out["video"].append(i)
    return {k: np.array(v) for k, v in out.items()}


def spread(z: np.ndarray) -> dict[str, float]:
    """Collapse diagnostics of clip embeddings ``z: (N, D)`` (L2-normalised here): mean
    per-dimension std, and the effective rank exp(H(sigma / sum sigma)) of the centred matrix."""
    z = z.astype(np.float64)   # float32 LAPACK did not converge on a collapsed run's 2800 x 64 features
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sv = np.linalg.svd(z - z.mean(0), compute_uv=False)
    p = sv / sv.sum()
    return {"dim_std": float(z.std(0).mean()), "effective_rank": float(np.exp(-(p * np.log(p + 1e-12)).sum()))}


def run_features(work: Path, args, cfg, xtr, xte) -> dict:
    from mohico.eval.features import embed_views
    from mohico.datasets.load.eval_clips import LabelledVideo
    from mohico.eval.knn import load_eval_backbone

    runs = {}
    for seed in args.seeds:                          # the random init of each seed, embedded here
        torch.manual_seed(seed)
        bb = load_eval_backbone("random", _with_seed(cfg, seed))
        with torch.no_grad():
            f = [embed_views(bb, [LabelledVideo(str(i), 0, v) for i, v in enumerate(x)], torch.device("cpu")).feats
                 for x in (xtr, xte)]
        runs[f"random-s{seed}"] = f
    for name in args.runs:
        path = work / "runs" / name / features_name(args.test_videos)
        if path.exists():
            d = np.load(path)
            runs[name] = [d["train"], d["test"]]
        else:
            print(f"{path}: missing, skipped", flush=True)
    videos = (work / f"videos-train-{args.train_videos}", work / f"videos-test-{args.test_videos}")
    ref = np.load(work / "runs" / args.runs[0] / features_name(args.test_videos)) if args.runs else None
    if ref is None:
        raise SystemExit(f"give --runs with at least one run that has {features_name(args.test_videos)} "
                         "(for the clip order)")
    attrs = [shot_attributes(ref[f"{s}_sources"], v, cfg, args.clips) for s, v in zip(("train", "test"), videos)]
    labels = [np.repeat([sorted(set(ref["train_labels"].tolist())).index(lab) for lab in ref[f"{s}_labels"].tolist()],
                        args.clips) for s in ("train", "test")]
    res = {}
    print("run | dim std | eff. rank | clip kNN: motion label | first object's pattern | shape   (%)", flush=True)
    base = {k: _majority(attrs[0][k], attrs[1][k]) for k in ("pattern", "shape")}
    print(f"majority baselines: motion {100 / 5:.0f} | pattern {100 * base['pattern']:.1f} | "
          f"shape {100 * base['shape']:.1f}", flush=True)
    for name, (ftr, fte) in runs.items():
        ztr, zte = ftr.reshape(-1, ftr.shape[-1]), fte.reshape(-1, fte.shape[-1])
        r = spread(np.concatenate([ztr, zte]))
        r["motion_knn"] = knn_and_centroid(ztr, labels[0], zte, labels[1], 5)[0]
        for k in ("pattern", "shape"):
            cls = sorted(set(attrs[0][k]) | set(attrs[1][k]))
            ya, yb = (np.array([cls.index(v) for v in a[k]]) for a in attrs)
            r[f"{k}_knn"] = knn_and_centroid(ztr, ya, zte, yb, len(cls))[0]
        res[name] = r
        print(f"{name} | {r['dim_std']:.4f} | {r['effective_rank']:.1f} | {100 * r['motion_knn']:.1f} | "
              f"{100 * r['pattern_knn']:.1f} | {100 * r['shape_knn']:.1f}", flush=True)
    return res


def _majority(train: np.ndarray, test: np.ndarray) -> float:
    vals, counts = np.unique(train, return_counts=True)
    return float((test == vals[counts.argmax()]).mean())


def _with_seed(cfg, seed: int):
    import dataclasses

    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, seed=seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("upper", "flow", "features", "contrast"))
    ap.add_argument("--work", default="/tmp/mohico-motion-v2")
    ap.add_argument("--train-videos", type=int, default=200)
    ap.add_argument("--test-videos", type=int, default=500)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="key=value")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input", choices=("config", "rgb", "diff"), default="config",
                    help="upper: the config's model.backbone_options.input, RGB clips, or frame differences")
    ap.add_argument("--moving-only", action="store_true", help="upper: only clips > 70%% in motion")
    ap.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    ap.add_argument("--pos", choices=("instance", "class"), default="instance",
                    help="contrast: positives from the same video, or (oracle) from a video of the same class")
    ap.add_argument("--tau", type=float, default=0.1, help="contrast: NT-Xent temperature")
    ap.add_argument("--lr", type=float, default=0.0, help="0: 0.05 for sgd, 2e-3 for adamw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="features: random inits to embed")
    ap.add_argument("--runs", nargs="*", default=["nce-s0", "nce-s1", "nce-s2", "mcl-s0", "mcl-s1", "mcl-s2"])
    ap.add_argument("--out", default="", help="write the result as JSON here")
    args = ap.parse_args()
    from mohico.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, args.set)
    work = Path(args.work)
    xtr, ytr, xte, yte, classes = clip_arrays(work, args, cfg)
    if args.what == "flow":
        res = run_flow(xtr, ytr, xte, yte, classes, cfg)
    elif args.what == "contrast":
        from motion_contrast import run_contrast

        res = run_contrast(xtr, ytr, xte, yte, classes, cfg, args, clip_moving(work, args, cfg)[0])
    elif args.what == "upper":
        res = run_upper(xtr, ytr, xte, yte, classes, cfg, args,
                        clip_moving(work, args, cfg) if args.moving_only else None)
    else:
        res = run_features(work, args, cfg, xtr, xte)
    if args.out:
        from mohico.utils import atomic_write_json

        atomic_write_json(args.out, {"args": vars(args), "result": res})


if __name__ == "__main__":
    main()
