"""Deterministic evaluation clips of labelled shards: what evaluation (``mohico eval``, online kNN,
the fine-tune test) embeds, built from the training loader's own pieces.

For every sample of the shards (:func:`iter_labelled`): ``clips_per_video`` temporal clips of
``data.clip_len`` frames at ``data.frame_stride`` (at ``data.reference_fps`` when set: the same
seconds as training), centred in equal segments of the video (:func:`eval_starts`; one clip = the
centre clip), times ``spatial_crops`` squares of the short side spread along the long side
(:func:`crop_boxes`; one = the centre square), each resized to ``data.crop_size`` and normalised with
``data.mean`` / ``data.std`` -- no augmentation (:data:`IDENTITY_AUG`). Clips are cut with
:class:`mohico.datasets.load.remux.ClipRemuxer`, decoded by :func:`mohico.datasets.load.remux.decode_frames`
and transformed by :func:`mohico.datasets.load.pipeline_cpu.transform_clip` (the training pipeline's
PyAV path). The sample's members, metadata and label are read as
:mod:`mohico.datasets.sample_schema` says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mohico.datasets.load.pipeline_cpu import transform_clip
from mohico.datasets.load.pipeline_stream import iter_shard
from mohico.datasets.load.remux import ClipRemuxer, decode_frames
from mohico.datasets.load.sampling import clip_frames, clip_span, max_start, video_stride
from mohico.datasets.sample_schema import JSON_MEMBER, no_video_member, parse_meta, video_member
from mohico.datasets.shard_list import expand_shards
from mohico.errors import MohicoError

IDENTITY_AUG = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "grayscale": False,
                "blur_sigma": 0.0, "flip": False}


def eval_starts(num_frames: int, clip_len: int, stride: float, clips: int) -> list[int]:
    """Start frames of ``clips`` clips centred in equal segments of the video (1: the centre clip)."""
    span, hi = clip_span(clip_len, stride), max_start(num_frames, clip_len, stride)
    return [int(min(max(round((i + 0.5) * num_frames / clips - span / 2), 0), hi)) for i in range(clips)]


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the short side, ``(x, y, w, h)`` whole pixels."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def crop_boxes(width: int, height: int, crops: int = 1) -> list[tuple[int, int, int, int]]:
    """``crops`` squares of the short side spread evenly along the long side (1: the centre square;
    3: left/centre/right, or top/centre/bottom for portrait frames -- the 3-crop test protocol)."""
    if crops < 1:
        raise MohicoError(f"spatial crops must be >= 1, got {crops}")
    if crops == 1:
        return [center_box(width, height)]
    side = min(width, height)
    slack_x, slack_y = width - side, height - side
    return [(round(i * slack_x / (crops - 1)), round(i * slack_y / (crops - 1)), side, side) for i in range(crops)]


@dataclass
class LabelledVideo:
    """One video's evaluation clips, its key, label and source name."""
    key: str
    label: object            # None when the shards carry no label (only with require_label=False)
    clips: np.ndarray        # (clips_per_video * spatial_crops, 3, T, S, S) float32, normalised; clip-major
    source: str = ""


def iter_labelled(shards, data_cfg, clips_per_video: int = 1, where: str = "shards", spatial_crops: int = 1,
                  require_label: bool = True) -> Iterator[LabelledVideo]:
    """Every sample of ``shards`` (pattern, folder or list file) as deterministic clips + label:
    ``clips_per_video`` temporal clips x ``spatial_crops`` crops (:func:`crop_boxes`) each.
    Raises MohicoError for a sample that cannot be read, and (``require_label``) for one without
    a ``label``."""
    for url in expand_shards(shards, allow_commands=getattr(data_cfg, "allow_commands", False)):
        errors: list[str] = []
        for sample in iter_shard(url, errors):
            name = f"{url}:{sample['__key__']}"
            try:
                meta = parse_meta(sample[JSON_MEMBER])
                num_frames, fps, width, height = meta["num_frames"], meta["fps"], meta["width"], meta["height"]
            except (KeyError, ValueError, TypeError) as e:
                raise MohicoError(f"{name}: no readable metadata json ({type(e).__name__}: {e})") from None
            label = meta.get("label")
            if label is None and require_label:
                raise MohicoError(f"{name}: the {where} carry no labels (json 'label' is missing or null); "
                                  f"write them with `mohico shards SRC OUT --labels LABELS.json` or give "
                                  f"them at eval time with `--labels LABELS.json`")
            ext = video_member(sample)
            if ext is None:
                raise MohicoError(no_video_member(name))
            boxes = crop_boxes(width, height, spatial_crops)
            out = []
            stride = video_stride(data_cfg.frame_stride, data_cfg.reference_fps, fps)   # same seconds as training
            with ClipRemuxer(sample[ext], fps, name) as rem:
                for start in eval_starts(num_frames, data_cfg.clip_len, stride, clips_per_video):
                    fr = clip_frames(start, data_cfg.clip_len, stride, num_frames)
                    cut = rem.cut(int(fr.min()), int(fr.max()))
                    frames = decode_frames(cut.data, fr - cut.key_frame, name)
                    out.extend(transform_clip(frames, box, IDENTITY_AUG, data_cfg.crop_size, data_cfg.mean,
                                              data_cfg.std) for box in boxes)
            yield LabelledVideo(str(sample["__key__"]), label, np.stack(out), str(meta.get("source", "")))
        if errors:
            raise MohicoError(f"{url}: cannot read the shard to its end: {errors[0]}")
