"""The motion benchmark's sanity arm: the floor any video-contrastive method must clear at its budget.

A label-free in-batch NT-Xent (SimCLR's loss: no memory bank, no EMA key encoder) whose two views
are two *different moving clips of one video*, trained with AdamW on the train videos' fixed eval
clips (the 4 centre clips per video ``motion_ablation.eval_clips`` decodes), horizontal flip the
only augmentation. "Moving" is the synthetic ground truth (more than 70% of the clip's frames in
motion), not MCL's motion estimate: this arm asks what the budget allows when the positives are
right, so MCL's own rows can be read against it (``benchmarks/RESULTS.md``, motion benchmark).

The backbone and MCL's projection head come from the config (``configs/motion_bench_cpu.yaml``:
width-8 R3D on residual frames); batch 8 videos, ``steps`` steps, one-cycle lr (peak 2e-3), tau
0.1. The trained backbone is written as a mohico backbone file (``RUN/backbone.pt``) that the
ablation's evaluation reads like any checkpoint.

This module sits at the bottom of the motion benchmark's scripts: the contrast diagnostic and the
ablation import its pieces (NT-Xent logits, optimiser, flips), it imports none of them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

MOVING = 0.7          # a clip is "moving" when more than this share of its frames move (ground truth)


def nt_xent_logits(z: torch.Tensor, tau: float, labels: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent's logits and targets for ``z: (2B, d)``, whose rows ``i`` and ``i + B`` are a
    positive pair: ``logits: (2B, 2B)`` = ``z z^T / tau`` with each row's own entry at -inf and
    ``target: (2B,)`` its pair. With ``labels: (2B,)`` the row's other rows of its class are -inf
    too (SupCon's rule: a same-class clip is not a negative); the pair itself is kept."""
    n2 = z.shape[0]
    target = torch.arange(n2).roll(n2 // 2)
    logits = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same[torch.arange(n2), target] = False
        logits = logits.masked_fill(same, float("-inf"))
    return logits, target


def optimiser(params, opt: str, steps: int, lr: float | None = None) -> tuple:
    """``(optimizer, one-cycle schedule over steps, peak lr)``: SGD momentum 0.9 (lr 0.05) or
    AdamW (2e-3) unless ``lr``, weight decay 1e-4."""
    params = list(params)
    lr = lr or (0.05 if opt == "sgd" else 2e-3)
    o = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4) if opt == "sgd"
         else torch.optim.AdamW(params, lr=lr, weight_decay=1e-4))
    return o, torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps, pct_start=0.1), lr


def step(opt, sched, loss: torch.Tensor) -> float:
    """One optimiser and schedule step on ``loss``; returns its value."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def random_flip(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``xb: (B, C, T, H, W)``, each clip mirrored left-right with probability 1/2 (in place)."""
    flip = torch.rand(len(xb), generator=gen) < 0.5
    xb[flip] = xb[flip].flip(-1)
    return xb


def moving_fractions(gt: dict, data_cfg, clips: int) -> list[float]:
    """Share of each of a video's ``clips`` eval clips' frames in motion (its ground truth ``gt``,
    ``mohico synth --task motion``'s json), at the stride the eval and training clips use:
    ``data.frame_stride`` frames at ``data.reference_fps`` on a video at ``gt["fps"]``."""
    from mohico.datasets.load.sampling import clip_frames, video_stride
    from mohico.datasets.load.eval_clips import eval_starts

    mv, n = np.asarray(gt["moving"], np.float64), int(gt["num_frames"])
    stride = video_stride(data_cfg.frame_stride, data_cfg.reference_fps, float(gt["fps"]))
    return [float(mv[clip_frames(s, data_cfg.clip_len, stride, n)].mean())
            for s in eval_starts(n, data_cfg.clip_len, stride, clips)]


def train_sanity(out: Path, videos, truth: Path, cfg, seed: int, steps: int, batch: int = 8,
                 tau: float = 0.1, opt: str = "adamw") -> dict:
    """Train the sanity arm and write ``out`` (a mohico backbone file); returns its log.

    ``videos``: the train videos' eval clips (``LabelledVideo`` list, ``clips: (C, 3, T, S, S)``);
    ``truth``: the folder of their ground-truth jsons (``video_NNNNN.json``, by ``source``).
    Each step: ``batch`` videos with two or more moving clips, two different moving clips each.
    """
    from mohico.models.backbone_file import save_backbone
    from mohico.models.backbones import build_backbone
    from mohico.models.heads import MCLProjection

    import torch.nn.functional as F

    moving = [np.flatnonzero(np.array(moving_fractions(json.loads((truth / Path(v.source).with_suffix(".json").name)
                                                                   .read_text()), cfg.data, len(v.clips))) > MOVING)
              for v in videos]
    eligible = [i for i, m in enumerate(moving) if len(m) >= 2]
    if len(eligible) < batch:
        raise SystemExit(f"sanity arm: only {len(eligible)} train videos have two moving clips; need >= {batch}")
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model.backbone, **dict(cfg.model.backbone_options))
    head = MCLProjection(backbone.out_dim, cfg.model.proj_hidden or None, cfg.model.proj_dim)
    o, sched, lr = optimiser([*backbone.parameters(), *head.parameters()], opt, steps)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        pick = [eligible[i] for i in torch.randperm(len(eligible), generator=gen)[:batch].tolist()]
        pairs = [rng.choice(moving[i], size=2, replace=False) for i in pick]
        a = torch.from_numpy(np.stack([videos[i].clips[p[0]] for i, p in zip(pick, pairs)]))
        b = torch.from_numpy(np.stack([videos[i].clips[p[1]] for i, p in zip(pick, pairs)]))
        z = head(backbone(random_flip(torch.cat([a, b]), gen)))
        logits, target = nt_xent_logits(z, tau)
        losses.append(step(o, sched, F.cross_entropy(logits, target)))
    save_backbone(out, cfg.model.backbone, dict(cfg.model.backbone_options), backbone)
    return {"steps": steps, "batch": batch, "tau": tau, "opt": opt, "lr": lr, "eligible_videos": len(eligible),
            "loss_first": float(np.mean(losses[:25])), "loss_last": float(np.mean(losses[-25:])),
            "chance_loss": float(np.log(2 * batch - 1)), "seconds": time.perf_counter() - t0}
