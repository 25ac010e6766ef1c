"""Does the tiny pretraining learn anything? Clip -> video retrieval, random init vs pretrained.

Synthesises untrimmed videos, writes shards, trains configs/tiny_cpu.yaml on 2 CPU ranks (the
`make demo` run), then embeds `--clips` evenly spaced centre clips per video with (a) the config's
backbone at its random init and (b) the pretrained backbone, side by side in this process.
Even-indexed clips form the gallery, odd-indexed clips the queries: top-1 is the fraction of
queries whose nearest gallery clip (cosine) comes from the same video (chance = 1 / videos).
Also prints the mean cosine between clips of different videos (1.0 = collapsed).

    .venv/bin/python benchmarks/pretrain_sanity.py [--videos 8] [--steps 300] [--work /tmp/mohico-sanity]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def clip_embeddings(backbone, videos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(embeddings (N, D) L2-normalised, video index (N,), clip index within its video (N,))``."""
    feats, owner, index = [], [], []
    backbone.eval()
    with torch.no_grad():
        for v, video in enumerate(videos):
            x = torch.from_numpy(video.clips)
            feats.append(torch.nn.functional.normalize(backbone(x).float(), dim=1))
            owner += [v] * len(x)
            index += list(range(len(x)))
    return torch.cat(feats), torch.tensor(owner), torch.tensor(index)


def retrieval(emb, owner, index) -> dict[str, float]:
    gallery, query = index % 2 == 0, index % 2 == 1
    nearest = (emb[query] @ emb[gallery].T).argmax(dim=1)
    top1 = (owner[gallery][nearest] == owner[query]).float().mean().item()
    sim = emb @ emb.T
    other = owner[:, None] != owner[None, :]
    return {"top1": top1, "cos_other_videos": sim[other].mean().item(),
            "dim_std": emb.std(dim=0).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--clips", type=int, default=8, help="clips per video (half gallery, half queries)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work", default="/tmp/mohico-sanity")
    args = ap.parse_args()

    from mohico.config import load_config
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize
    from mohico.datasets.load.eval_clips import iter_labelled
    from mohico.eval.knn import load_eval_backbone

    work = Path(args.work)
    shards, run = work / f"shards-{args.videos}", work / f"run-{args.videos}-{args.steps}"
    if not (shards / "manifest.json").exists():
        synthesize(work / f"videos-{args.videos}", videos=args.videos, seed=0, duration=10.0, workers=2)
        write_shards(work / f"videos-{args.videos}", shards, short_side=112, workers=2,
                     labels=work / f"videos-{args.videos}" / "labels.json")
    if not (run / "checkpoints" / "latest").exists():
        env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
        cmd = [sys.executable, "-m", "mohico", "train", str(ROOT / "configs" / "tiny_cpu.yaml"), "--nproc", "2",
               f"run.dir={run}", f"data.shards={shards}", f"trainer.max_steps={args.steps}",
               "checkpoint.resume=never"]
        subprocess.run(cmd, env=env, check=True)

    cfg = load_config(run / "config.yaml")
    videos = list(iter_labelled(str(shards), cfg.data, clips_per_video=args.clips))
    rows = {}
    for name, ckpt in (("random init", "random"), ("pretrained", run)):
        torch.manual_seed(cfg.trainer.seed)
        rows[name] = retrieval(*clip_embeddings(load_eval_backbone(ckpt, cfg), videos))
    print(f"clip -> video retrieval, {len(videos)} videos x {args.clips} clips, {args.steps} steps "
          f"(chance top-1 {1 / len(videos):.3f})")
    print(f"{'backbone':<12} {'top-1':>7} {'cos(other videos)':>18} {'per-dim std':>12}")
    for name, r in rows.items():
        print(f"{name:<12} {r['top1']:7.3f} {r['cos_other_videos']:18.3f} {r['dim_std']:12.4f}")
    a, b = rows["random init"]["top1"], rows["pretrained"]["top1"]
    print(f"ratio pretrained / random top-1: {b / max(a, 1e-9):.2f}")


if __name__ == "__main__":
    main()
