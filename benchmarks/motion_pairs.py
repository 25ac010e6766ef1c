"""What do MCL's positive pairs share? The query/key draw of each ``sampling.mcl_temporal`` rule on
the motion benchmark's train videos, against their ground truth.

For every train video of an ablation work dir (``benchmarks/motion_ablation.py``: its shards and
the synth's ground-truth jsons), ``--draws`` query/key draws of :class:`ClipSampler` (MCL alone,
the config's clips) per rule: the share of pairs that are the same clip, that overlap in frames,
and that lie in the same shot (the ground truth's cuts: the same actors, which instance
discrimination can match without the motion), and the mean distance between the two clips. Also
how many of the ground-truth cuts the shards' own cut detector found (``meta["cuts"]``, what
``sampling.avoid_cuts`` can use).

    .venv/bin/python benchmarks/motion_pairs.py [--work /tmp/mohico-motion-v2] [--train-videos 200] [--draws 20]
"""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def shard_metas(shards: Path) -> list[dict]:
    """The sample jsons of every shard in ``shards`` (tar order)."""
    out = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out += [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    return out


def pair_stats(metas: list[dict], truths: list[dict], cfg, rule: str, draws: int) -> dict:
    """Shares of same-clip, overlapping and same-shot (ground truth) query/key pairs under ``rule``."""
    from mohico.datasets.load.sampling import ClipSampler, clip_span

    cfg.sampling.mcl_temporal = rule
    sampler = ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False)
    same = overlap = shot = 0
    dist = []
    for i, (meta, gt) in enumerate(zip(metas, truths)):
        span, cuts = clip_span(cfg.data.clip_len, sampler.stride(float(meta["fps"]))), sorted(gt["cuts"])
        for r in range(draws):
            a, b = (int(s) for s in sampler.temporal(meta, np.random.default_rng(i * draws + r))[0][:2])
            same += a == b
            overlap += abs(a - b) < span
            shot += np.searchsorted(cuts, a, "right") == np.searchsorted(cuts, b, "right")
            dist.append(abs(a - b) / float(meta["fps"]))
    n = len(dist)
    return {"same_clip": same / n, "overlapping": overlap / n, "same_shot": shot / n,
            "mean_distance_s": float(np.mean(dist)), "pairs": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mohico-motion-v2")
    ap.add_argument("--train-videos", type=int, default=200)
    ap.add_argument("--draws", type=int, default=20, help="query/key draws per video and rule")
    args = ap.parse_args()
    from mohico.config import load_config

    work = Path(args.work)
    metas = shard_metas(work / f"shards-train-{args.train_videos}")
    if not metas:
        raise SystemExit(f"{work}/shards-train-{args.train_videos}: no shards; run benchmarks/motion_ablation.py first")
    videos = work / f"videos-train-{args.train_videos}"
    truths = [json.loads((videos / Path(m["source"]).with_suffix(".json").name).read_text()) for m in metas]
    cfg = load_config(ROOT / "configs" / "motion_bench_cpu.yaml")
    found = sum(any(abs(c - d) <= 1 for d in m.get("cuts") or []) for m, gt in zip(metas, truths) for c in gt["cuts"])
    print(f"{len(metas)} train videos; the shards' cut detector found {found} of {sum(len(g['cuts']) for g in truths)} "
          "ground-truth cuts")
    print("| rule | same clip | overlapping | same shot | mean distance s | pairs |\n|---|---|---|---|---|---|")
    for rule in ("pool", "halves"):
        s = pair_stats(metas, truths, cfg, rule, args.draws)
        print(f"| {rule} | {100 * s['same_clip']:.1f}% | {100 * s['overlapping']:.1f}% | {100 * s['same_shot']:.1f}% | "
              f"{s['mean_distance_s']:.2f} | {s['pairs']} |")


if __name__ == "__main__":
    main()
