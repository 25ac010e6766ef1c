"""``motion_diagnostics.py contrast``: can a contrastive loss find the motion labels at this batch
and budget? The ablation's backbone + MCL's projection trained with SimCLR's NT-Xent on the eval
clips, with instance positives (two clips of one video) or class positives (the oracle: the labels
choose them), and the video kNN along the way against the random init."""
from __future__ import annotations

import time

import numpy as np
import torch

from motion_diagnostics import _optimiser, _random_flip, _step, knn_and_centroid


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


def run_contrast(xtr, ytr, xte, yte, classes, cfg, args) -> dict:
    """NT-Xent on the eval clips: a batch of ``B`` videos, two clips each (``--pos``), ``2B - 2``
    negatives per query; random flips; one-cycle lr. Video kNN (the L2-normalised mean of a video's
    raw clip features, :func:`knn_and_centroid`) at step 0 and 4 times along the way.

    ``--pos class`` (the oracle: a clip of another video of the query's class is its positive):
    the batch's other clips of the query's class are left out of its negatives, as in SupCon (before
    2026-11-26 they were negatives: the oracle pushed apart the very pairs it pulled together, about
    two of the 14 negatives at batch 8 and 5 classes). The chance loss is then the mean over queries of
    ln(1 + its negatives)."""
    import torch.nn.functional as F

    from mohico.models.backbones import build_backbone
    from mohico.models.heads import MCLProjection

    torch.manual_seed(args.seed)
    backbone = build_backbone(cfg.model.backbone, **dict(cfg.model.backbone_options))
    head = MCLProjection(backbone.out_dim, cfg.model.proj_hidden or None, cfg.model.proj_dim)
    opt, sched, lr = _optimiser([*backbone.parameters(), *head.parameters()], args)
    x, xt = torch.from_numpy(xtr), torch.from_numpy(xte)
    videos, clips = xtr.shape[:2]
    same_class = [np.flatnonzero(ytr == c) for c in range(len(classes))]
    if args.batch > videos or (args.pos == "class" and min(len(v) for v in same_class) < 2):
        raise SystemExit(f"contrast: --batch {args.batch} needs <= {videos} train videos, and --pos class "
                         f"two or more videos of every class (smallest: {min(len(v) for v in same_class)})")
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    n = args.batch
    chance = float(np.log(2 * n - 1))
    if args.pos == "class":     # expected ln(1 + negatives): 2B - 2 others less the other same-class clips
        ys = np.random.default_rng(0).integers(len(classes), size=(4000, n))
        same = (ys[:, :, None] == ys[:, None, :]).sum(-1) - 1                   # other videos of the class
        chance = float(np.mean(np.log(2 * n - 1 - 2 * same)))

    def video_knn() -> float:
        backbone.eval()
        with torch.no_grad():
            f = [torch.cat([backbone(v[i:i + 16].flatten(0, 1)) for i in range(0, len(v), 16)]) for v in (x, xt)]
        backbone.train()
        f = [F.normalize(a.view(len(v), v.shape[1], -1).mean(1), dim=-1).numpy() for a, v in zip(f, (x, xt))]
        return knn_and_centroid(f[0], ytr, f[1], yte, len(classes))[0]

    curve = [{"step": 0, "knn": video_knn()}]
    print(f"step 0 (random init): video kNN {100 * curve[0]['knn']:.1f}; chance loss {chance:.2f}", flush=True)
    losses, every, t0 = [], max(args.steps // 4, 1), time.perf_counter()
    for step in range(1, args.steps + 1):
        vids = torch.randperm(videos, generator=gen)[:n].numpy()
        a = torch.randint(clips, (n,), generator=gen).numpy()
        if args.pos == "instance":                      # another clip of the same video
            other, b = vids, (a + torch.randint(1, clips, (n,), generator=gen).numpy()) % clips
        else:                                           # a clip of another video of the same class
            other = np.array([rng.choice(same_class[ytr[v]][same_class[ytr[v]] != v]) for v in vids])
            b = torch.randint(clips, (n,), generator=gen).numpy()
        z = head(backbone(_random_flip(torch.cat([x[vids, a], x[other, b]]), gen)))
        y = torch.from_numpy(np.concatenate([ytr[vids], ytr[other]])) if args.pos == "class" else None
        logits, target = nt_xent_logits(z, args.tau, y)
        losses.append(_step(opt, sched, F.cross_entropy(logits, target)))
        if step % every == 0 or step == args.steps:
            curve.append({"step": step, "loss": float(np.mean(losses[-every:])), "knn": video_knn(),
                          "seconds": time.perf_counter() - t0})
            print(f"step {step}: NT-Xent {curve[-1]['loss']:.3f} (chance {chance:.2f}), video kNN "
                  f"{100 * curve[-1]['knn']:.1f} ({curve[-1]['seconds']:.0f} s)", flush=True)
    return {"curve": curve, "pos": args.pos, "opt": args.opt, "lr": lr, "tau": args.tau, "batch": n,
            "steps": args.steps, "chance_loss": chance}
