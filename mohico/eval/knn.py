"""kNN evaluation of a pretrained backbone on labelled shards (``mohico eval``).

The quick probe of SSL codebases (InstDisc, solo-learn, PySlowFast's kNN monitor): embed every
video of a labelled *train* and *val* set with the frozen backbone, then classify each val video
by a weighted vote of its ``k`` nearest train videos::

    s_ij  = cos(f_val_i, f_train_j)                      (L2-normalised embeddings)
    w_ij  = exp(s_ij / T)   for the k largest s_ij       (InstDisc / solo-learn weighting, T = 0.07)
    score_i(c) = sum_{j in top-k, y_j = c} w_ij          -> top-1 / top-5 accuracy

The top-n prediction is the first n classes by descending score, ties to the lower class index,
among the classes that got at least one vote: a class none of the ``k`` neighbours voted for is
never a hit (with k = 1, top-5 = top-1), as in solo-learn's ``WeightedKNNClassifier``.

A video's embedding is the mean of the L2-normalised pooled backbone embeddings of its
deterministic evaluation clips (``clips_per_video`` clips centred in equal segments of the video,
each a centre square crop, no augmentation), which :mod:`mohico.datasets.load.eval_clips` builds.

Labels are the shard json's ``label`` field (``mohico shards --labels``); integer or string
labels are mapped to class indices in sorted order of the union of train and val labels. A val
video whose key is also in the train set is not its own neighbour (leave-one-out), so the same
shards can be given as both sets.

This module holds the pieces the protocols build on (the vote, the backbone of a checkpoint); :func:`mohico.eval.protocols.knn_eval` runs the whole kNN
evaluation (features of both sets, then the vote).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from mohico.errors import MohicoError
from mohico.models.backbone_file import load_checkpoint_state
from mohico.models.backbones import build_backbone
from mohico.models.torchvision_import import torchvision_backbone_state, torchvision_name


# --------------------------------------------------------------------------- kNN math
def knn_vote(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
             k: int = 20, temperature: float = 0.07, exclude: Optional[torch.Tensor] = None,
             chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, votes)``, both ``(Q, num_classes)``: the weighted vote of the ``k`` nearest
    (cosine) rows of ``train: (N, D)`` with labels ``train_labels: (N,)`` in ``[0, num_classes)``
    for each row of ``query: (Q, D)``. ``scores`` (float32) sums the weights ``exp(cos / temperature)``
    of a class's voters, ``votes`` (int64) counts them. ``exclude: (Q, N)`` bool marks pairs that may
    not vote (e.g. a video and itself). ``k`` is capped at the train rows; excluded pairs never vote
    even if fewer than ``k`` remain."""
    if train.ndim != 2 or query.ndim != 2 or train.shape[1] != query.shape[1]:
        raise ValueError(f"knn_scores: train (N, D) and query (Q, D) with the same D; got "
                         f"{tuple(train.shape)}, {tuple(query.shape)}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn_scores: k >= 1 and temperature > 0; got k={k}, temperature={temperature}")
    train = nn.functional.normalize(train.float(), dim=1)
    query = nn.functional.normalize(query.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.zeros(query.shape[0], num_classes, dtype=torch.float32, device=query.device)
    votes = torch.zeros(query.shape[0], num_classes, dtype=torch.int64, device=query.device)
    for s in range(0, query.shape[0], chunk):
        sim = query[s:s + chunk] @ train.t()                                   # (q, N)
        if exclude is not None:
            sim = sim.masked_fill(exclude[s:s + chunk].to(sim.device), float("-inf"))
        top, idx = sim.topk(k, dim=1)
        weight = torch.exp(top / temperature)                                 # exp(-inf) = 0: no vote
        voter_labels = train_labels.to(idx.device)[idx]
        out[s:s + chunk].scatter_add_(1, voter_labels, weight)
        votes[s:s + chunk].scatter_add_(1, voter_labels, torch.isfinite(top).long())
    return out, votes


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, exclude: Optional[torch.Tensor] = None,
               chunk: int = 1024) -> torch.Tensor:
    """Class scores ``(Q, num_classes)`` of ``query: (Q, D)`` by a weighted vote of the ``k``
    nearest (cosine) rows of ``train: (N, D)``: the ``scores`` of :func:`knn_vote` (which see)."""
    return knn_vote(train, train_labels, query, num_classes, k, temperature, exclude, chunk)[0]


def ranked_classes(scores: torch.Tensor, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(Q, C)`` class indices of ``scores: (Q, C)`` best first: by descending score, ties to the
    lower class index (a stable sort of ``-score``), then the classes not in ``candidates: (Q, C)``
    bool (e.g. no kNN vote), among themselves in class order."""
    key = -scores.double()
    if candidates is not None:
        key = key.masked_fill(~candidates.to(key.device), float("inf"))
    return torch.sort(key, dim=1, stable=True).indices


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5),
                  candidates: Optional[torch.Tensor] = None) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` in [0, 1] of ``scores: (Q, C)`` against ``labels: (Q,)``: a hit
    when the label is among the first ``k`` of :func:`ranked_classes` (descending score, ties to the
    lower class index) and, if ``candidates: (Q, C)`` bool is given, is a candidate of its query. Without
    ``candidates`` top-k with k >= C is 1. The kNN passes "the class got a vote", so a class no neighbour
    voted for is never a hit (solo-learn's ``WeightedKNNClassifier`` rule; with ``k`` neighbours at
    most ``k`` classes can hit, and k = 1 gives top-5 = top-1)."""
    out = {}
    n = scores.shape[0]
    order = ranked_classes(scores, candidates)
    labels = labels.to(order.device)
    ok = torch.ones(n, dtype=torch.bool) if candidates is None else \
        candidates.to(order.device).gather(1, labels[:, None])[:, 0]
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (order[:, :kk] == labels[:, None]).any(dim=1) & ok
        out[f"top{k}"] = int(hit.sum()) / max(n, 1)
    return out


# --------------------------------------------------------------------------- backbone from a checkpoint
def load_eval_backbone(ckpt, cfg, config_path=None) -> nn.Module:
    """The backbone of ``cfg.model`` with the weights of ``ckpt`` (a run dir, a checkpoint folder,
    an exported mohico backbone file or a zero_to_fp32 output, whose backbone ``config_path``
    names: :func:`mohico.models.backbone_file.load_checkpoint_state`; or a torchvision state_dict of the
    config's backbone, e.g. ``mohico export --format torchvision``'s output:
    :mod:`mohico.models.torchvision_import`). ``ckpt="random"``: the config's backbone at its random init
    (seeded with ``trainer.seed``), the baseline to compare a pretrained one with."""
    if str(ckpt) == "random":
        torch.manual_seed(cfg.trainer.seed)
        return build_backbone(cfg.model.backbone, **cfg.model.backbone_options)

    name = torchvision_name(ckpt, cfg.model.backbone)
    state = torchvision_backbone_state(ckpt, name)
    if state is not None:            # a torchvision state_dict: the config gives the options (width 64)
        options = dict(cfg.model.backbone_options)
    else:
        name, options, state = load_checkpoint_state(ckpt, config_path)
    want = (cfg.model.backbone, dict(cfg.model.backbone_options))
    if (name, dict(options)) != want:
        raise MohicoError(f"{ckpt}: the checkpoint holds backbone {name!r} with options {dict(options)}, the config "
                          f"asks for {want[0]!r} with {want[1]}; give the run's config (RUN_DIR/config.yaml) or "
                          f"override model.backbone / model.backbone_options")
    backbone = build_backbone(name, **options)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MohicoError(f"{ckpt}: weights do not fit backbone {name!r} with options {options}: "
                          f"{str(e).splitlines()[0]}") from e
    return backbone


def embedding_stats(emb: torch.Tensor, labels: Sequence) -> dict[str, float]:
    """Collapse diagnostics of per-video embeddings ``(V, D)``: mean pairwise cosine between
    different videos (1 = collapsed), the same for videos of different labels, and the mean
    per-dimension std of the L2-normalised embeddings (0 = collapsed; ~1/sqrt(D) if spread)."""
    z = nn.functional.normalize(emb.double(), dim=1)
    n = z.shape[0]
    cos = z @ z.t()
    off = ~torch.eye(n, dtype=torch.bool)
    lab = list(labels)
    diff = torch.tensor([[lab[i] != lab[j] for j in range(n)] for i in range(n)])
    return {"mean_cos_other_videos": float(cos[off].mean()) if n > 1 else math.nan,
            "mean_cos_other_labels": float(cos[diff].mean()) if bool(diff.any()) else math.nan,
            "mean_cos_same_label": float(cos[off & ~diff].mean()) if bool((off & ~diff).any()) else math.nan,
            "mean_dim_std": float(z.std(dim=0).mean()) if n > 1 else math.nan}
