"""The batch the pretraining loader yields: :class:`ClipBatch`, one typed object instead of a dict.

``VideoLoader`` (``datasets/load/pipeline.py``) assembles it in the main process from the
workers' samples; the trainer moves it with :meth:`ClipBatch.to` and reads its fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class ClipBatch:
    """``B`` videos x ``V`` views (``V = cfg.objectives.num_views``) of ``T`` frames each.

    - ``clips: (B, V, C, T, H, W)`` float32, normalised (``data.mean`` / ``data.std``); on the GPU
      when DALI decodes there.
    - ``motion: (B, V, T, Hm, Wm)`` float32 MAL targets, cut to each view's crop box and flipped with it.
    - ``video_id: (B,)`` int64 stable id of each video (from its key; equal ids: the same video).
    - ``key: list[str]`` (length B) the shard sample keys.
    - ``boxes: (B, V, 4)`` float32 crop boxes ``(x, y, w, h)`` in stored-frame pixels.
    - ``frames: (B, V, T)`` int64 frame indices of each view's clip.
    - ``flip: (B, V)`` bool, the view was flipped horizontally.
    - ``crop_motion: (B, V)`` bool, the view's crop was motion-focused (else random).
    - ``progress: (B,)`` float32 training progress the sample was drawn at.

    Built in the main process (the DataLoader workers return samples and ``VideoLoader``
    collates them), so it never crosses a process boundary: no custom collate, no pinning.
    """
    clips: torch.Tensor
    motion: torch.Tensor
    video_id: torch.Tensor
    key: list[str]
    boxes: torch.Tensor
    frames: torch.Tensor
    flip: torch.Tensor
    crop_motion: torch.Tensor
    progress: torch.Tensor

    def __post_init__(self):
        b = len(self.key)
        if self.clips.ndim != 6 or self.clips.shape[0] != b:
            raise ValueError(f"ClipBatch: clips must be (B, V, C, T, H, W) with B = len(key) = {b}; "
                             f"got {tuple(self.clips.shape)}")
        if self.video_id.dtype != torch.int64 or self.video_id.shape != (b,):
            raise ValueError(f"ClipBatch: video_id must be int64 ({b},); got {self.video_id.dtype} "
                             f"{tuple(self.video_id.shape)}")

    @property
    def size(self) -> int:
        """``B``, the number of videos."""
        return len(self.key)

    def _map(self, fn) -> "ClipBatch":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                           if torch.is_tensor(getattr(self, f.name))})

    def to(self, device, non_blocking: bool = False) -> "ClipBatch":
        """A copy with every tensor on ``device`` (``key`` is shared)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))
