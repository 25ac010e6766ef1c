"""``motion_diagnostics.py contrast``: can a contrastive loss find the motion labels at this batch
and budget? The ablation's backbone + MCL's projection trained with SimCLR's NT-Xent on the eval
clips, with instance positives (two clips of one video) or class positives (the oracle: the labels
choose them), and the video kNN along the way against the random init."""
from __future__ import annotations

import time

import numpy as np
import torch

from motion_scores import knn_and_centroid
from motion_sanity import MOVING, nt_xent_logits, optimiser, random_flip, step as opt_step  # noqa: F401 (nt_xent_logits: public here too)


def run_contrast(xtr, ytr, xte, yte, classes, cfg, args, moving: np.ndarray) -> dict:
    """NT-Xent on the eval clips: a batch of ``B`` videos, two clips each (``--pos``), ``2B - 2``
    negatives per query; random flips; one-cycle lr. Video kNN (the L2-normalised mean of a video's
    raw clip features, :func:`knn_and_centroid`) at step 0 and 4 times along the way.

    ``--pos class`` (the oracle: a clip of another video of the query's class is its positive):
    the batch's other clips of the query's class are left out of its negatives, as in SupCon (before
    2026-11-26 they were negatives: the oracle pushed apart the very pairs it pulled together, about
    two of the 14 negatives at batch 8 and 5 classes). The chance loss is then the mean over queries of
    ln(1 + its negatives).

    Both kinds draw their clips among the *moving* ones (``moving: (V, clips)``, the ground truth's
    share of each train clip's frames in motion, > ``MOVING``): about 40% of the eval clips are
    still, and a still clip shares no class signal (before 2026-12-06 any clip was drawn, so most
    oracle pairs held a still clip)."""
    import torch.nn.functional as F

    from mohico.models.backbones import build_backbone
    from mohico.models.heads import MCLProjection

    torch.manual_seed(args.seed)
    backbone = build_backbone(cfg.model.backbone, **dict(cfg.model.backbone_options))
    head = MCLProjection(backbone.out_dim, cfg.model.proj_hidden or None, cfg.model.proj_dim)
    opt, sched, lr = optimiser([*backbone.parameters(), *head.parameters()], args.opt, args.steps, args.lr)
    x, xt = torch.from_numpy(xtr), torch.from_numpy(xte)
    mov = [np.flatnonzero(m > MOVING) for m in moving]                     # each video's moving clips
    usable = np.array([len(m) >= (2 if args.pos == "instance" else 1) for m in mov])
    eligible = np.flatnonzero(usable)
    same_class = [np.flatnonzero((ytr == c) & usable) for c in range(len(classes))]
    if args.batch > len(eligible) or (args.pos == "class" and min(len(v) for v in same_class) < 2):
        raise SystemExit(f"contrast: --batch {args.batch} needs <= {len(eligible)} train videos with moving clips, and "
                         f"--pos class two or more such videos of every class (smallest: "
                         f"{min(len(v) for v in same_class)})")
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
        vids = eligible[torch.randperm(len(eligible), generator=gen)[:n].numpy()]
        if args.pos == "instance":                      # another moving clip of the same video
            other = vids
            a, b = np.stack([rng.choice(mov[v], size=2, replace=False) for v in vids]).T
        else:                                           # a moving clip of another video of the same class
            other = np.array([rng.choice(same_class[ytr[v]][same_class[ytr[v]] != v]) for v in vids])
            a = np.array([rng.choice(mov[v]) for v in vids])
            b = np.array([rng.choice(mov[o]) for o in other])
        z = head(backbone(random_flip(torch.cat([x[vids, a], x[other, b]]), gen)))
        y = torch.from_numpy(np.concatenate([ytr[vids], ytr[other]])) if args.pos == "class" else None
        logits, target = nt_xent_logits(z, args.tau, y)
        losses.append(opt_step(opt, sched, F.cross_entropy(logits, target)))
        if step % every == 0 or step == args.steps:
            curve.append({"step": step, "loss": float(np.mean(losses[-every:])), "knn": video_knn(),
                          "seconds": time.perf_counter() - t0})
            print(f"step {step}: NT-Xent {curve[-1]['loss']:.3f} (chance {chance:.2f}), video kNN "
                  f"{100 * curve[-1]['knn']:.1f} ({curve[-1]['seconds']:.0f} s)", flush=True)
    return {"curve": curve, "pos": args.pos, "opt": args.opt, "lr": lr, "tau": args.tau, "batch": n,
            "steps": args.steps, "chance_loss": chance}
