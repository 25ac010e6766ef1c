"""ClipBatch builder for tests: the given fields, every other one filled in consistently."""
from __future__ import annotations

import torch

from mohico.datasets.load.batch import ClipBatch


def make_batch(clips: torch.Tensor, **fields) -> ClipBatch:
    """``clips: (B, V, C, T, H, W)``; missing fields: zero motion on an ``H x W`` grid, ids and
    keys ``0..B-1``, full-frame boxes, frames ``0..T-1``, no flips, random crops, progress 0."""
    b, v, _, t, h, w = clips.shape
    defaults = {"motion": torch.zeros(b, v, t, h, w), "video_id": torch.arange(b, dtype=torch.int64),
                "key": [f"video{i}" for i in range(b)],
                "boxes": torch.tensor([0.0, 0.0, w, h]).expand(b, v, 4).clone(),
                "frames": torch.arange(t, dtype=torch.int64).expand(b, v, t).clone(),
                "flip": torch.zeros(b, v, dtype=torch.bool), "crop_motion": torch.zeros(b, v, dtype=torch.bool),
                "progress": torch.zeros(b)}
    return ClipBatch(clips=clips, **{**defaults, **fields})
