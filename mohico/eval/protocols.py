"""Evaluation protocols on frozen features: kNN, retrieval and linear probe (``mohico eval PROTOCOL``).

Python API (stable; every protocol takes two labelled :class:`~mohico.eval.features.FeatureSet`
and returns a JSON-able dict):

- ``features(backbone, cfg, shards, labels=None, clips_per_video=1, spatial_crops=1, cache_dir=None, ...)``
  -> labelled FeatureSet (``feats: (V, C, D)``), extracted once and cached;
- ``knn(train, test, k=20, temperature=0.07)`` -> ``{"top1", "top5", ...}`` (InstDisc weighted vote);
- ``retrieval(train, test, ks=(1, 5, 10, 20, 50), center=True)`` -> ``{"recall@1", ..., "recall@50",
  "retrieval_protocol", ...}``;
- ``linear(train, test, lrs=..., weight_decays=..., epochs=100, ...)`` -> ``{"top1", "top5", "lr",
  "weight_decay", "search": [...], ...}``;
- ``retrieval_recall(gallery, gallery_labels, query, query_labels, ks, exclude, center=True)`` on arrays;
- ``run_protocol(name, backbone, cfg, train_shards, test_shards, options={...}, precise_bn_batches=0, ...)``
  does both steps (with ``precise_bn_batches`` > 0, after re-estimating the BN statistics on the train
  views: :func:`mohico.eval.features.precise_bn`);
  ``knn_eval(backbone, cfg, train_shards, val_shards, k=20, ...)`` is its kNN case.

**Retrieval** (CoCLR's ``test_retrieval``, the code behind most published UCF101/HMDB51 recall@k):
each set's video features (a video: the mean of its L2-normalised view embeddings) are centred by
that set's own mean (train minus the train mean, test minus the test mean), L2-normalised, and each
test video queries the train videos by cosine similarity; recall@k is the fraction of queries with a
video of their class among the k nearest. ``center=False`` (``--no-center``) skips the centring:
plain cosine of the video features. The result names which (``"retrieval_protocol"``:
``"coclr-centred"`` or ``"uncentred"``). CoCLR averages its clips' raw features; here the views are
L2-normalised before the mean. **kNN**: :mod:`mohico.eval.knn` (a class no neighbour voted
for is never a top-5 hit; ties to the lower class index). **Linear**: a linear classifier trained on
every view of the train videos (:func:`mohico.eval.linear_probe.fit_linear`), its learning rate and weight decay
picked by stratified k-fold cross-validation on train (video-level top-1 pooled over the folds;
``folds=1``: one stratified held-out part), then refit on all of train;
test top-1/top-5 from the softmax averaged over a video's views. In every protocol a test video
whose key is also a train video never matches itself (leave-one-out), so one shard set may be both.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from mohico.datasets.load.eval_clips import iter_labelled
from mohico.errors import MohicoError
from mohico.eval.features import FeatureSet, class_index, extract_features, precise_bn
from mohico.eval.knn import knn_vote, ranked_classes, topk_accuracy
from mohico.eval.linear_probe import fit_linear, stratified_folds, stratified_holdout, video_probabilities

PROTOCOLS = ("knn", "retrieval", "linear")
RECALL_KS = (1, 5, 10, 20, 50)
RETRIEVAL_PROTOCOLS = {True: "coclr-centred", False: "uncentred"}     # center -> the name in the results
LINEAR_LRS = (0.01, 0.1, 1.0)
LINEAR_WDS = (0.0, 1e-3, 1e-2, 1e-1)   # on standardised features; 1e-4 and below changed no choice
LINEAR_FOLDS = 5


def features(backbone, cfg, shards, labels: Optional[dict] = None, clips_per_video: int = 1, spatial_crops: int = 1,
             cache_dir=None, batch_size: int = 16, device="cpu", progress: bool = False,
             where: str = "shards") -> FeatureSet:
    """The labelled FeatureSet of ``shards`` (``labels`` override the shards'; unlabelled videos dropped)."""
    fs = extract_features(backbone, cfg, shards, clips_per_video, spatial_crops, batch_size, device, cache_dir,
                          progress, where)
    return fs.relabel(labels).labelled(where)


def _self_pairs(test: FeatureSet, train: FeatureSet) -> torch.Tensor:
    """``(Q, N)`` bool: the test video is that train video (same key)."""
    pos = {k: i for i, k in enumerate(train.keys)}
    ex = torch.zeros(len(test), len(train), dtype=torch.bool)
    for q, k in enumerate(test.keys):
        if k in pos:
            ex[q, pos[k]] = True
    return ex


def _chance(train_y: np.ndarray, num_classes: int) -> float:
    counts = np.bincount(train_y, minlength=num_classes)
    return float(counts.max() / counts.sum())


def _common(train: FeatureSet, test: FeatureSet, classes) -> dict:
    return {"num_train": len(train), "num_test": len(test), "num_classes": len(classes),
            "views_per_video": int(test.feats.shape[1]), "unlabelled_train": len(train.unlabelled),
            "unlabelled_test": len(test.unlabelled)}


# --------------------------------------------------------------------------- kNN
def knn(train: FeatureSet, test: FeatureSet, k: int = 20, temperature: float = 0.07) -> dict:
    """Weighted kNN top-1/top-5 of ``test`` videos voted by ``train`` videos (video features ``(V, D)``;
    :mod:`mohico.eval.knn`): a hit when the label is among the first n classes by descending
    score (ties to the lower class index) of the classes that got a vote; ``pred`` is the first."""
    classes, (ty, qy) = class_index(train.labels, test.labels)
    exclude = _self_pairs(test, train)
    if bool(exclude.all(dim=1).any()):
        raise MohicoError("a test video has no train video other than itself to vote: give more train videos")
    scores, votes = knn_vote(torch.from_numpy(train.video_features()), torch.from_numpy(ty),
                             torch.from_numpy(test.video_features()), len(classes), k, temperature, exclude)
    pred = ranked_classes(scores, votes > 0)[:, 0]
    return {**topk_accuracy(scores, torch.from_numpy(qy), (1, 5), votes > 0), "k": k, "temperature": temperature,
            **_common(train, test, classes), "leave_one_out": int(exclude.any(dim=1).sum()),
            "chance_top1": _chance(ty, len(classes)),
            "per_video": [{"key": key, "label": lab, "pred": classes[int(p)]}
                          for key, lab, p in zip(test.keys, test.labels, pred)]}


# --------------------------------------------------------------------------- retrieval
def retrieval_similarity(gallery, query, center: bool = True) -> torch.Tensor:
    """``(Q, N)`` float64 cosine similarity of ``query: (Q, D)`` to ``gallery: (N, D)``; ``center``:
    each set minus its own mean first (CoCLR). Raises MohicoError for bad shapes, and when centring a
    set of one row (centring leaves it no direction)."""
    g = torch.as_tensor(np.asarray(gallery), dtype=torch.float64)
    q = torch.as_tensor(np.asarray(query), dtype=torch.float64)
    if g.ndim != 2 or q.ndim != 2 or g.shape[1] != q.shape[1]:
        raise MohicoError(f"retrieval: gallery (N, D) and query (Q, D); got {tuple(g.shape)}, {tuple(q.shape)}")
    if center:
        if len(g) < 2 or len(q) < 2:
            raise MohicoError(f"retrieval: centring each set by its own mean needs >= 2 videos per set, got "
                              f"{len(g)} train and {len(q)} test videos; give more or turn centring off (--no-center)")
        g, q = g - g.mean(dim=0, keepdim=True), q - q.mean(dim=0, keepdim=True)
    g, q = torch.nn.functional.normalize(g, dim=1), torch.nn.functional.normalize(q, dim=1)
    return q @ g.t()


def retrieval_recall(gallery, gallery_labels, query, query_labels, ks: Sequence[int] = RECALL_KS,
                     exclude=None, center: bool = True) -> dict[str, float]:
    """``{"recall@k": fraction of queries with a same-label gallery item among their k nearest by
    cosine}`` for ``gallery: (N, D)``, ``query: (Q, D)``, integer labels ``(N,)`` / ``(Q,)``;
    ``center``: each set minus its own mean before the L2-normalisation (CoCLR's protocol; False:
    plain cosine); ``exclude: (Q, N)`` bool pairs never retrieved. ``k`` larger than the gallery counts
    the whole (allowed) gallery."""
    sim = retrieval_similarity(gallery, query, center)
    gl = torch.as_tensor(np.asarray(gallery_labels), dtype=torch.int64)
    ql = torch.as_tensor(np.asarray(query_labels), dtype=torch.int64)
    if len(gl) != sim.shape[1] or len(ql) != sim.shape[0]:
        raise MohicoError(f"retrieval: one label per gallery and query row; got {len(gl)} labels for {sim.shape[1]} "
                          f"gallery rows, {len(ql)} for {sim.shape[0]} queries")
    if not ks or min(ks) < 1:
        raise MohicoError(f"retrieval: recall ks must be >= 1, got {list(ks)}")
    if exclude is not None:
        sim = sim.masked_fill(torch.as_tensor(np.asarray(exclude), dtype=torch.bool), float("-inf"))
    kmax = min(max(ks), sim.shape[1])
    top, idx = sim.topk(kmax, dim=1)
    hit = (gl[idx] == ql[:, None]) & torch.isfinite(top)                  # (Q, kmax)
    first = torch.cumsum(hit.int(), dim=1) > 0
    return {f"recall@{k}": float(first[:, min(k, kmax) - 1].double().mean()) for k in ks}


def retrieval(train: FeatureSet, test: FeatureSet, ks: Sequence[int] = RECALL_KS, center: bool = True) -> dict:
    """Test videos query train videos (module docstring: ``center`` = CoCLR's centring of each set by its
    own mean); also each query's nearest train video and ``"retrieval_protocol"``."""
    classes, (ty, qy) = class_index(train.labels, test.labels)
    exclude = _self_pairs(test, train)
    if bool(exclude.all(dim=1).any()):
        raise MohicoError("a test video has no train video other than itself to retrieve: give more train videos")
    gf, qf = train.video_features(), test.video_features()
    res = retrieval_recall(gf, ty, qf, qy, ks, exclude.numpy(), center)
    nearest = retrieval_similarity(gf, qf, center).masked_fill(exclude, float("-inf")).argmax(dim=1)
    return {**res, "ks": list(ks), "retrieval_protocol": RETRIEVAL_PROTOCOLS[bool(center)],
            **_common(train, test, classes), "leave_one_out": int(exclude.any(dim=1).sum()),
            "chance_recall@1": float(np.mean([np.mean(ty == c) for c in qy])),
            "per_video": [{"key": key, "label": lab, "nearest": train.keys[int(j)], "nearest_label": train.labels[int(j)]}
                          for key, lab, j in zip(test.keys, test.labels, nearest)]}


# --------------------------------------------------------------------------- linear probe
def linear(train: FeatureSet, test: FeatureSet, lrs: Sequence[float] = LINEAR_LRS,
           weight_decays: Sequence[float] = LINEAR_WDS, epochs: int = 100, batch_size: int = 256,
           folds: int = LINEAR_FOLDS, val_fraction: float = 0.2, seed: int = 0, device="cpu",
           progress: bool = False) -> dict:
    """Linear probe: grid search by ``folds``-fold cross-validation on train (``folds=1``: on one
    held-out ``val_fraction`` of it), refit on all of train, test top-1/top-5 with the softmax averaged
    over each video's views. Each setting's ``val_top1`` is the held-out video top-1 pooled over the
    folds (correct / train videos); the first best in grid order (lr-major) is refit.

    Why folds: with one held-out part of 40 videos the scores moved in 2.5-point steps, and the same
    saved features, probed again with another thread count, got another lr for 2 of 9 motion-benchmark
    backbones, moving their test top-1 by up to about 4 points
    (benchmarks/reports/2026-11-26-motion-benchmark-500-test-videos.md)."""
    from tqdm import tqdm

    classes, (ty, qy) = class_index(train.labels, test.labels)
    k = len(classes)
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not grid:
        raise MohicoError("linear probe: give at least one learning rate and weight decay")
    overlap = set(train.keys) & set(test.keys)
    if overlap:
        raise MohicoError(f"linear probe: {len(overlap)} test videos are also train videos (e.g. {sorted(overlap)[0]}); "
                          "a classifier would be tested on what it was trained on: give disjoint train and test shards")
    c = train.feats.shape[1]

    def views(fs_feats, y):
        return fs_feats.reshape(-1, fs_feats.shape[2]), np.repeat(y, fs_feats.shape[1])

    search = []
    if folds < 1:
        raise MohicoError(f"linear probe: folds must be >= 1, got {folds}")
    if len(grid) > 1:
        if folds == 1:
            held = stratified_holdout(ty, val_fraction, seed)
            if not held.any() or held.all():
                raise MohicoError(f"linear probe: no held-out train videos to choose among {len(grid)} settings "
                                  f"(every class has fewer than 2 train videos); give more videos or a single --lr/--wd")
            parts = [held]
        else:
            fold = stratified_folds(ty, folds, seed)
            parts = [fold == f for f in range(folds)]
        for lr, wd in tqdm(grid, desc="linear search", disable=not progress, dynamic_ncols=True):
            correct = 0
            for held in parts:
                xf, yf = views(train.feats[~held], ty[~held])
                probe = fit_linear(xf, yf, k, lr, wd, epochs, batch_size, seed=seed, device=device)
                pred = video_probabilities(probe, train.feats[held]).argmax(dim=1).numpy()
                correct += int((pred == ty[held]).sum())
            search.append({"lr": lr, "weight_decay": wd, "val_top1": correct / int(sum(h.sum() for h in parts))})
        best = max(search, key=lambda r: r["val_top1"])                 # first best in grid order
        lr, wd = best["lr"], best["weight_decay"]
    else:
        lr, wd = grid[0]
    xf, yf = views(train.feats, ty)
    probe = fit_linear(xf, yf, k, lr, wd, epochs, batch_size, seed=seed, device=device)
    probs = video_probabilities(probe, test.feats)
    pred = probs.argmax(dim=1)
    return {**topk_accuracy(probs, torch.from_numpy(qy), (1, 5)), "lr": lr, "weight_decay": wd, "epochs": epochs,
            "search": search, "folds": folds if len(grid) > 1 else 0,
            "val_fraction": val_fraction if len(grid) > 1 and folds == 1 else 0.0,
            **_common(train, test, classes), "train_views": int(len(xf)), "views_per_train_video": int(c),
            "chance_top1": _chance(ty, k),
            "per_video": [{"key": key, "label": lab, "pred": classes[int(p)]}
                          for key, lab, p in zip(test.keys, test.labels, pred)]}


# --------------------------------------------------------------------------- backbone + shards
def run_protocol(name: str, backbone, cfg, train_shards, test_shards, options: Optional[dict] = None,
                 labels: Optional[dict] = None, clips_per_video: int = 1, spatial_crops: int = 1, cache_dir=None,
                 batch_size: int = 16, device="cpu", progress: bool = False, precise_bn_batches: int = 0) -> dict:
    """Extract (or read cached) features of both shard sets (``batch_size`` clips per forward pass),
    then run protocol ``name`` with keyword ``options`` (e.g. ``{"k": 20}``, ``{"ks": [1, 5]}``,
    ``{"lrs": [0.1], "epochs": 50}``). ``precise_bn_batches`` > 0: first re-estimate the backbone's
    BN statistics on that many batches of the train shards' views (:func:`precise_bn`); 0 keeps the
    backbone's running statistics. The result says which (``"bn_statistics"``, and the clips used:
    ``"bn_precise_clips"``, 0 for the running statistics or a backbone without BN)."""
    options = dict(options or {})
    fn = {"knn": knn, "retrieval": retrieval, "linear": linear}.get(name)
    if fn is None:
        raise MohicoError(f"unknown evaluation protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    used = 0
    if precise_bn_batches > 0:
        views = (clip for v in iter_labelled(train_shards, cfg.data, clips_per_video, "precise BN", spatial_crops,
                                             require_label=False) for clip in v.clips)
        used = precise_bn(backbone, views, torch.device(device), batch_size, precise_bn_batches)
    bn_statistics = f"precise: {used} train clips" if used else "running"
    common = dict(labels=labels, clips_per_video=clips_per_video, spatial_crops=spatial_crops, cache_dir=cache_dir,
                  batch_size=batch_size, device=device, progress=progress)
    train = features(backbone, cfg, train_shards, where="train shards", **common)
    test = train if str(test_shards) == str(train_shards) else features(backbone, cfg, test_shards,
                                                                         where="test shards", **common)
    if name == "linear":
        options.setdefault("device", device)
        options.setdefault("progress", progress)
    res = fn(train, test, **options)
    return {"protocol": name, "clips_per_video": clips_per_video, "spatial_crops": spatial_crops,
            "bn_statistics": bn_statistics, "bn_precise_clips": used, **res}


def knn_eval(backbone: torch.nn.Module, cfg, train_shards, val_shards, k: int = 20, temperature: float = 0.07,
             clips_per_video: int = 1, batch_size: int = 16, device: str | torch.device = "cpu",
             labels: Optional[dict] = None) -> dict:
    """Embed both sets and return ``{"top1", "top5", "k", "temperature", "num_train", "num_val",
    "num_classes", "chance_top1", "clips_per_video", "per_video": [...]}``
    (:func:`knn` on :func:`features`)."""
    if clips_per_video < 1:
        raise MohicoError(f"clips_per_video must be >= 1, got {clips_per_video}")
    res = run_protocol("knn", backbone, cfg, train_shards, val_shards, {"k": k, "temperature": temperature},
                       labels=labels, clips_per_video=clips_per_video, batch_size=batch_size, device=device)
    return {**res, "num_val": res["num_test"]}
