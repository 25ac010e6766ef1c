"""Which frames and which box: HiCo gradual and MCL motion-focused sampling (pure numpy).

The boxes themselves (random resized crop, MCL's motion crop, motion targets cut to a box) live in
:mod:`mohico.datasets.load.crops` and are re-exported here.

Everything here is deterministic given a ``numpy.random.Generator``; the loader derives one
per sample occurrence with :func:`sample_rng` from ``(seed, epoch, rank, key)``, so the same
sample in the same epoch always gets the same clips, boxes and augmentation draws, whatever the
number of loader workers or the timing of the run.

Clip geometry and the temporal draws (clip conventions, MCL's halves and pool draws, HiCo's
v_i / v_j / v_k) live in :mod:`mohico.datasets.load.temporal` and are re-exported here.

Conventions
- Boxes are ``(x, y, w, h)`` floats in the coordinates of the map they were computed on
  (motion-grid cells); :meth:`ClipSampler.sample` also returns them in stored-frame pixels,
  rounded to whole pixels so that the decoder and the motion targets use exactly the same box.

Views (``ClipSampler``): V = 2 with only MCL (query, key); V = 4 with MCL's official variant
(query, the query's clip again under its own crop and augmentation, two keys of the other half);
V = 3 when HiCo is on (v_i, v_j, v_k). With both on, v_i is drawn motion-focused (with probability ``motion_prob``
among the clips at or above the median clip score, else uniformly), v_j within ``delta_max`` of
v_i (among the high-motion starts of that window when the draw is motion-focused and the window
has any, else uniformly in the window), v_k anywhere (at least ``far_min_gap`` seconds from v_i
when set). v_i / v_j double as MCL's query / key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mohico.datasets.load.temporal import (clip_frames, clip_offsets, clip_scores, clip_span,  # noqa: F401
                                           cut_free_starts, gradual_delta, hico_starts, high_motion_starts,
                                           max_start, mcl_half_starts, mcl_starts, top_ranked, video_stride)
from mohico.datasets.load.crops import (box_coverage, crop_resize_maps, hot_mask, min_crop_side,  # noqa: F401
                                        motion_crop_box, motion_crop_candidates, official_crop_box, pixel_box,
                                        random_resized_crop)


# --------------------------------------------------------------------------- determinism
def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, rank: int, key: str, draw: int = 0) -> np.random.Generator:
    """The generator for one sample occurrence: ``SeedSequence([seed, epoch, rank, hash(key)])``;
    draw ``r > 0`` of a video read several times (``data.samples_per_read``) appends ``r``."""
    h = stable_hash(key)
    words = [int(seed) & 0xFFFFFFFF, int(epoch), int(rank), h & 0xFFFFFFFF, h >> 32]
    if draw:
        words.append(int(draw))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


# --------------------------------------------------------------------------- augmentation draws
def draw_augment(rng: np.random.Generator, aug) -> dict:
    """One augmentation draw for one clip (shared by its frames).

    ``aug``: :class:`mohico.config.AugmentConfig`. Returns brightness / contrast / saturation
    factors, hue shift in degrees (torchvision's hue fraction x 360), ``grayscale``,
    ``blur_sigma`` (0: no blur) and ``flip``. Jitter is applied in a fixed order
    (brightness, contrast, saturation, hue).
    """
    b, c, s, hue = aug.color_jitter
    jitter = rng.random() < aug.color_jitter_prob
    draws = rng.uniform(-1, 1, size=4)                 # always drawn: stable stream layout
    gray = rng.random() < aug.grayscale_prob
    blur = rng.random() < aug.blur_prob
    sigma = rng.uniform(aug.blur_sigma[0], aug.blur_sigma[1])
    flip = rng.random() < aug.flip_prob
    return {
        "brightness": float(1 + b * draws[0]) if jitter else 1.0,
        "contrast": float(1 + c * draws[1]) if jitter else 1.0,
        "saturation": float(1 + s * draws[2]) if jitter else 1.0,
        "hue": float(hue * draws[3] * 360.0) if jitter else 0.0,
        "grayscale": bool(gray),
        "blur_sigma": float(sigma) if blur else 0.0,
        "flip": bool(flip),
    }


# --------------------------------------------------------------------------- the per-video sampler
@dataclass
class SampleDraw:
    """Everything the pipeline needs for one video: ``V`` views of ``T`` frames."""
    starts: np.ndarray                 # (V,) int64 clip starts
    frames: np.ndarray                 # (V, T) int64 frame indices
    boxes: np.ndarray                  # (V, 4) int64 (x, y, w, h) in stored-frame pixels
    map_boxes: np.ndarray              # (V, 4) float64 the same boxes in motion-grid cells
    crop_methods: list[str]            # per view: "motion" or "random"
    augment: list[dict]                # per view, see draw_augment
    motion: np.ndarray                 # (V, T, Hm, Wm) float32 MAL targets (cropped, flipped)
    focused: bool = False              # the temporal draw was motion-focused
    delta_max: float = 0.0             # seconds, as used for v_j
    extra: dict = field(default_factory=dict)


class ClipSampler:
    """Draws the views of one video from its metadata and motion maps.

    ``sampling``/``data``: :class:`SamplingConfig` / :class:`DataConfig`; ``mcl``/``hico``:
    whether each objective is on. The trainer reports progress with :meth:`set_progress`.
    """

    def __init__(self, sampling, data, mcl: bool, hico: bool, views: Optional[int] = None):
        if not (mcl or hico):
            raise ValueError("ClipSampler needs MCL or HiCo enabled")
        self.s, self.d, self.mcl, self.hico = sampling, data, bool(mcl), bool(hico)
        self.views = int(views) if views else (3 if hico else 2)
        if self.views not in ((3,) if hico else (2, 4)):
            raise ValueError(f"ClipSampler draws 2 or 4 views for MCL alone and 3 with HiCo; asked for {self.views}")
        self.progress = 0.0
        self.counts: dict[str, int] = {}     # draws that fell back (the loader adds them to data/*)

    def set_progress(self, progress: float) -> None:
        self.progress = min(max(float(progress), 0.0), 1.0)

    def delta_max(self, progress: Optional[float] = None) -> float:
        p = self.progress if progress is None else progress
        return gradual_delta(p, self.s.delta) if self.s.gradual else float(self.s.delta)

    def stride(self, fps: float) -> float:
        """Frames between a clip's frames in a video at ``fps`` (see :func:`video_stride`)."""
        return video_stride(self.d.frame_stride, self.d.reference_fps, fps)

    def candidates(self, meta: dict) -> Optional[np.ndarray]:
        """Starts the draws may use: the clips spanning no shot cut when ``sampling.avoid_cuts``
        and the video has cuts and such clips exist, else None (every valid start)."""
        cuts = meta.get("cuts") or []
        if not self.s.avoid_cuts or not len(cuts):
            return None
        n, fps = int(meta["num_frames"]), float(meta["fps"])
        free = cut_free_starts(n, self.d.clip_len, self.stride(fps), cuts)
        return free if len(free) else None

    def temporal(self, meta: dict, rng: np.random.Generator, progress: Optional[float] = None
                 ) -> tuple[np.ndarray, bool, float]:
        """Clip starts ``(V,)``, whether the draw was motion-focused, and delta_max."""
        n = int(meta["num_frames"])
        fps = float(meta["fps"])
        T, stride = self.d.clip_len, self.stride(fps)
        tm = meta.get("tmotion")
        dmax = self.delta_max(progress)
        cands = self.candidates(meta)
        if self.mcl and tm is not None and len(tm):
            tm = np.nan_to_num(np.asarray(tm, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            tm = tm[:n] if len(tm) >= n else np.pad(tm, (0, n - len(tm)), mode="edge")
            if not self.hico:
                keys = self.views // 2                   # 1: (query, key); 2: (query, query, key, key)
                drawn = None
                if self.s.mcl_temporal == "halves":
                    drawn = mcl_half_starts(tm, T, stride, rng, self.s.motion_prob, n_keys=keys, candidates=cands)
                    if drawn is None:
                        self.counts["mcl_short_video"] = self.counts.get("mcl_short_video", 0) + 1
                starts, focused = drawn or mcl_starts(tm, T, stride, rng, self.s.motion_prob, n=1 + keys,
                                                      candidates=cands)
                if self.views == 4:                      # the query's clip twice: two augmentations of it
                    starts = np.concatenate([starts[:1], starts])
                return starts, focused, dmax
            focused = bool(rng.random() < self.s.motion_prob)
            high = None
            if focused:
                pool = np.arange(max_start(n, T, stride) + 1) if cands is None else cands
                high = pool[high_motion_starts(clip_scores(tm, T, stride)[pool])]
            return hico_starts(n, fps, T, stride, dmax, rng, self.s.far_min_gap,
                               anchor_pool=high, near_pool=high, candidates=cands), focused, dmax
        if self.hico:
            return hico_starts(n, fps, T, stride, dmax, rng, self.s.far_min_gap, candidates=cands), False, dmax
        every = np.arange(max_start(n, T, stride) + 1) if cands is None else cands
        starts = rng.choice(every, size=1 + self.views // 2).astype(np.int64)
        return (np.concatenate([starts[:1], starts]) if self.views == 4 else starts), False, dmax

    def motion_crop(self, s_motion: np.ndarray, rng: np.random.Generator
                    ) -> tuple[tuple[float, float, float, float], str]:
        """MCL's crop box on one clip's ``(gh, gw)`` S-motion map, by ``sampling.crop_rule``
        (``((x, y, w, h)`` in map cells, ``"motion"`` or ``"random"``)."""
        s = self.s
        if s.crop_rule == "official":
            return official_crop_box(s_motion, rng, s.crop_area, s.crop_aspect, s.crop_max_sizes,
                                     s.crop_max_positions)
        return motion_crop_box(s_motion, s.crop_percentile, s.crop_coverage, rng, s.crop_area, s.crop_aspect,
                               s.crop_max_sizes, s.crop_max_positions)

    def sample(self, meta: dict, motion: Optional[np.ndarray], rng: np.random.Generator,
               progress: Optional[float] = None) -> SampleDraw:
        """All views of one video.

        meta: the shard's json (``num_frames, fps, width, height, tmotion, motion.scale``);
        motion: ``(N, gh, gw)`` uint8 motion maps or None (flat maps: random crops, zero
        targets).
        """
        T, stride = self.d.clip_len, self.stride(float(meta["fps"]))
        n, width, height = int(meta["num_frames"]), int(meta["width"]), int(meta["height"])
        starts, focused, dmax = self.temporal(meta, rng, progress)
        frames = np.stack([clip_frames(s, T, stride, n) for s in starts])
        if motion is None:
            gh, gw = (meta.get("motion") or {}).get("grid") or (height, width)
            maps_all = None
        else:
            gh, gw = motion.shape[1:]
            scale = float((meta.get("motion") or {}).get("scale", 255.0))
        stride_px = (meta.get("motion") or {}).get("stride")
        sx, sy = (float(stride_px), float(stride_px)) if stride_px else (width / gw, height / gh)
        out_hw = (self.d.motion_size, self.d.motion_size)
        boxes, map_boxes, methods, augs, targets = [], [], [], [], []
        for v in range(len(starts)):
            if motion is not None:
                idx = np.minimum(frames[v], motion.shape[0] - 1)
                maps_all = motion[idx].astype(np.float32) * (scale / 255.0)      # (T, gh, gw)
            if self.mcl and self.s.motion_crop and maps_all is not None:   # MCL's crop; HiCo alone: random
                box, method = self.motion_crop(maps_all.mean(axis=0), rng)
            else:
                box, method = None, "random"
            if method == "random":     # plain random resized crop over the whole frame, in pixels
                px = pixel_box(random_resized_crop(height, width, rng, self.s.crop_area, self.s.crop_aspect),
                               1.0, 1.0, width, height)
            else:
                px = pixel_box(box, sx, sy, width, height)
            mbox = (px[0] / sx, px[1] / sy, px[2] / sx, px[3] / sy)      # exactly the pixel box
            aug = draw_augment(rng, self.d.augment)
            if maps_all is not None:
                targets.append(crop_resize_maps(maps_all, mbox, out_hw, aug["flip"]))
            else:
                targets.append(np.zeros((T, *out_hw), np.float32))
            boxes.append(px); map_boxes.append(mbox); methods.append(method); augs.append(aug)
        return SampleDraw(starts=starts, frames=frames, boxes=np.array(boxes, np.int64),
                          map_boxes=np.array(map_boxes, np.float64), crop_methods=methods,
                          augment=augs, motion=np.stack(targets), focused=focused, delta_max=dmax)
