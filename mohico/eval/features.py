"""Frozen-backbone features of labelled shards, extracted once and cached (the input of every
evaluation protocol: :mod:`mohico.eval.protocols`).

Per video: ``clips_per_video`` deterministic temporal clips (centred in equal segments) x
``spatial_crops`` squares of the short side (:func:`mohico.datasets.load.eval_clips.crop_boxes`), each
embedded by the backbone and L2-normalised: ``FeatureSet.feats: (V, C, D)`` float32 with
``C = clips_per_video * spatial_crops`` views, clip-major.

Labels come from the shard json's ``label`` or, overriding it, from a labels file given at eval
time (``--labels FILE``: JSON ``{source: label}`` or ``source<TAB>label`` lines, matched on the
video's source name, file name, stem or shard key), so relabelling needs no re-encode. A video
with no label is skipped and counted (``FeatureSet.unlabelled``).

BN statistics: the frozen backbone embeds with its *running* BatchNorm statistics (those of its
training data; for ``random``, PyTorch's defaults, i.e. no normalisation), or, after
:func:`precise_bn`, with statistics re-estimated on the train clips (PySlowFast's precise BN: every
backbone, pretrained or random, normalised by the same data). On the motion benchmark the choice
moves a random init's kNN by ~11 points (``benchmarks/reports/2026-12-06-motion-bn-crop-hico.md``).

Cache: ``cache_dir/<sha256>.npz`` keyed by the backbone's weights (BN statistics included), the shard files (path, size,
mtime), the clip geometry (``data.clip_len, frame_stride, reference_fps, crop_size, mean, std``) and the view
counts. Labels are applied after the cache, so a new labels file reuses the features.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mohico.datasets.shard_list import expand_shards
from mohico.datasets.load.eval_clips import iter_labelled
from mohico.datasets.sample_schema import sample_label
from mohico.errors import MohicoError
from mohico.utils import atomic_write_bytes

CACHE_VERSION = 1


@dataclass
class FeatureSet:
    """``feats: (V, C, D)`` L2-normalised view embeddings of ``V`` videos; ``labels[i]`` the raw label
    (int or str; None = unlabelled); ``unlabelled``: videos dropped by :meth:`labelled`."""
    keys: list[str]
    sources: list[str]
    labels: list
    feats: np.ndarray
    unlabelled: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def video_features(self) -> np.ndarray:
        """``(V, D)``: the mean of each video's L2-normalised view embeddings."""
        return self.feats.mean(axis=1)

    def relabel(self, labels: Optional[dict]) -> "FeatureSet":
        """Labels from ``labels`` (source name, file name, stem or key) where given, else the shards'."""
        if not labels:
            return self

        new = [sample_label(labels, src, key, old) for key, src, old in zip(self.keys, self.sources, self.labels)]
        return replace(self, labels=new)

    def labelled(self, where: str = "shards") -> "FeatureSet":
        """Only the videos with a label; the others' keys in ``unlabelled``. Raises if none is left."""
        keep = [i for i, lab in enumerate(self.labels) if lab is not None]
        if not keep:
            raise MohicoError(f"none of the {len(self)} videos of the {where} has a label: write them with "
                              f"`mohico shards SRC OUT --labels LABELS.json` or give `--labels LABELS.json` "
                              f"(JSON {{source: label}} or 'source<TAB>label' lines)")
        kept = set(keep)
        return FeatureSet([self.keys[i] for i in keep], [self.sources[i] for i in keep],
                          [self.labels[i] for i in keep], self.feats[keep],
                          self.unlabelled + [k for i, k in enumerate(self.keys) if i not in kept])


def class_index(*label_lists: Sequence) -> tuple[list, list[np.ndarray]]:
    """``(classes, [int64 index arrays])``: classes sorted (ints before strs when mixed)."""
    allv = set()
    for labs in label_lists:
        allv.update(labs)
    try:
        classes = sorted(allv)
    except TypeError:
        classes = sorted(allv, key=lambda c: (isinstance(c, str), str(c)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, [np.array([index[c] for c in labs], dtype=np.int64) for labs in label_lists]


# --------------------------------------------------------------------------- extraction
def _count_videos(shards) -> Optional[int]:
    """The number of videos a shard folder's manifest.json records (progress bar total), else None."""
    p = Path(str(shards))
    try:
        if p.is_dir() and (p / "manifest.json").is_file():
            return int(json.loads((p / "manifest.json").read_text())["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


@torch.no_grad()
def embed_views(backbone: nn.Module, videos, device: torch.device, batch_size: int = 16,
                progress: bool = False, desc: str = "features", total: Optional[int] = None) -> FeatureSet:
    """Embed every view of every :class:`~mohico.datasets.load.eval_clips.LabelledVideo` of ``videos``,
    batched over views; returns raw labels (None where the shards have none)."""
    from tqdm import tqdm

    backbone.eval().to(device)
    dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)
    keys, sources, labels, views, feats, pending = [], [], [], [], [], []

    def flush():
        x = torch.from_numpy(np.stack(pending)).to(device, dtype)
        feats.append(nn.functional.normalize(backbone(x).float(), dim=1).cpu().numpy())
        pending.clear()

    bar = tqdm(total=total, desc=desc, unit="video", disable=not progress, dynamic_ncols=True)
    try:
        for v in videos:
            keys.append(v.key)
            sources.append(v.source)
            labels.append(v.label)
            views.append(len(v.clips))
            for clip in v.clips:
                pending.append(clip)
                if len(pending) >= batch_size:
                    flush()
            bar.update(1)
        if pending:
            flush()
    finally:
        bar.close()
    if not keys:
        raise MohicoError("no videos to embed (empty shards)")
    f = np.concatenate(feats).astype(np.float32)
    return FeatureSet(keys, sources, labels, f.reshape(len(keys), views[0], f.shape[1]))


@torch.no_grad()
def precise_bn(backbone: nn.Module, clips: Iterable[np.ndarray], device: torch.device, batch_size: int = 16,
               max_batches: int = 200) -> int:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``backbone`` on ``clips``
    (``(C, T, H, W)`` arrays, e.g. the train videos' eval views), ``batch_size`` clips a forward pass,
    at most ``max_batches`` passes: each statistic becomes the plain average over the passes of the
    pass's batch mean and unbiased batch variance (PySlowFast's precise BN, ``BN.USE_PRECISE_STATS`` /
    ``NUM_BATCHES_PRECISE``; PyTorch's cumulative average, ``momentum=None``). Weights are untouched;
    the backbone is left in eval mode with each layer's momentum as it was. Returns the clips used
    (0: no BN layer, nothing changed)."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    if batch_size < 2 or max_batches < 1:
        raise MohicoError(f"precise BN needs batches of >= 2 clips and >= 1 batch, got {batch_size} x {max_batches}")
    momenta = [m.momentum for m in bns]
    backbone.to(device)
    dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)
    batches, used, pending = 0, 0, []

    def forward() -> None:
        backbone(torch.from_numpy(np.stack(pending)).to(device, dtype))

    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        backbone.train()
        for clip in clips:
            pending.append(clip)
            if len(pending) == batch_size:
                forward()
                batches, used = batches + 1, used + len(pending)
                pending.clear()
                if batches == max_batches:
                    break
        if len(pending) > 1 and batches < max_batches:      # the remainder (a lone clip: no variance)
            forward()
            used += len(pending)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        backbone.eval()
    if not used:
        raise MohicoError("precise BN: no clips to estimate the statistics on (empty train shards)")
    return used


def backbone_digest(backbone: nn.Module) -> str:
    """sha256 of the backbone's class and every state tensor (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256(type(backbone).__qualname__.encode())
    for name, t in sorted(backbone.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(backbone: nn.Module, shards, data_cfg, clips_per_video: int, spatial_crops: int) -> str:
    files = []
    for u in expand_shards(shards, allow_commands=getattr(data_cfg, "allow_commands", False)):
        st = os.stat(u) if os.path.exists(u) else None
        files.append([os.path.abspath(u), st.st_size if st else None, st.st_mtime_ns if st else None])
    spec = {"version": CACHE_VERSION, "backbone": backbone_digest(backbone), "shards": files,
            "clip_len": data_cfg.clip_len, "frame_stride": data_cfg.frame_stride, "crop_size": data_cfg.crop_size,
            "reference_fps": data_cfg.reference_fps,
            "mean": list(data_cfg.mean), "std": list(data_cfg.std), "clips_per_video": clips_per_video,
            "spatial_crops": spatial_crops}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _save_cache(path: Path, fs: FeatureSet) -> None:
    buf = io.BytesIO()
    np.savez(buf, feats=fs.feats, meta=np.frombuffer(json.dumps(
        {"keys": fs.keys, "sources": fs.sources, "labels": fs.labels}).encode(), dtype=np.uint8))
    atomic_write_bytes(path, buf.getvalue())


def _load_cache(path: Path) -> Optional[FeatureSet]:
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return FeatureSet(meta["keys"], meta["sources"], meta["labels"], z["feats"].astype(np.float32))
    except (OSError, ValueError, KeyError) as e:
        logging.getLogger("mohico.eval").warning("feature cache %s unreadable (%s); extracting again", path, e)
        return None


def extract_features(backbone: nn.Module, cfg, shards, clips_per_video: int = 1, spatial_crops: int = 1,
                     batch_size: int = 16, device: str | torch.device = "cpu", cache_dir=None,
                     progress: bool = False, desc: str = "features") -> FeatureSet:
    """The :class:`FeatureSet` of ``shards`` (raw shard labels; see :meth:`FeatureSet.relabel`),
    read from / written to ``cache_dir`` when given."""
    if clips_per_video < 1 or spatial_crops < 1:
        raise MohicoError(f"clips per video and spatial crops must be >= 1, got {clips_per_video}, {spatial_crops}")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(backbone, shards, cfg.data, clips_per_video, spatial_crops)}.npz"
        if path.is_file():
            cached = _load_cache(path)
            if cached is not None:
                return cached
    videos = iter_labelled(shards, cfg.data, clips_per_video, desc, spatial_crops, require_label=False)
    fs = embed_views(backbone, videos, torch.device(device), batch_size, progress, desc, _count_videos(shards))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_cache(path, fs)
    return fs
