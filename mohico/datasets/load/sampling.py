"""Which frames and which box: HiCo gradual and MCL motion-focused sampling (pure numpy).

The boxes themselves (random resized crop, MCL's motion crop, motion targets cut to a box) live in
:mod:`mohico.datasets.load.crops` and are re-exported here.

Everything here is deterministic given a ``numpy.random.Generator``; the loader derives one
per sample occurrence with :func:`sample_rng` from ``(seed, epoch, rank, key)``, so the same
sample in the same epoch always gets the same clips, boxes and augmentation draws, whatever the
number of loader workers or the timing of the run.

Conventions
- A clip is ``clip_len`` frames at ``stride``: ``frames = start + round(arange(T) * stride)``
  (:func:`clip_offsets`); it spans ``clip_span = round((T - 1) * stride) + 1`` frames and must lie
  wholly inside the video, so ``0 <= start <= num_frames - clip_span``. Videos shorter than one
  span give start 0 and the indices are clamped to the last frame (the clip repeats its last frame).
- The stride is per video: ``data.frame_stride`` frames at ``data.reference_fps``, i.e.
  ``frame_stride * fps / reference_fps`` frames of a video at ``fps`` (:func:`video_stride`), so a
  config means the same seconds on shards of any fps; it may be fractional (nearest frames) or
  below 1 (frames repeat: a low-fps video is resampled by frame index, never stretched in time).
- With ``sampling.avoid_cuts`` the starts are drawn among those whose clip spans no shot cut
  (``meta["cuts"]``, :func:`cut_free_starts`) when the video has cuts and such starts exist.
- Clip centres are in seconds: ``c = (start + (clip_span - 1) / 2) / fps``.
- Boxes are ``(x, y, w, h)`` floats in the coordinates of the map they were computed on
  (motion-grid cells); :meth:`ClipSampler.sample` also returns them in stored-frame pixels,
  rounded to whole pixels so that the decoder and the motion targets use exactly the same box.

MCL alone draws its query and key (``sampling.mcl_temporal``) either as the official code does,
from different halves of the video (``halves``, :func:`mcl_half_starts`: the positive never is,
nor overlaps, the query's clip; a video too short for two clips falls back to the pool draw and is
counted as ``data/mcl_short_video``), or both from one pool with replacement (``pool``,
:func:`mcl_starts`: the key may be the query's own clip or overlap it).

Views (``ClipSampler``): V = 2 with only MCL (query, key); V = 4 with MCL's official variant
(query, the query's clip again under its own crop and augmentation, two keys of the other half);
V = 3 when HiCo is on
(v_i, v_j, v_k). With both on, v_i is drawn motion-focused (with probability ``motion_prob``
among the clips at or above the median clip score, else uniformly), v_j within ``delta_max`` of
v_i (among the high-motion starts of that window when the draw is motion-focused and the window
has any, else uniformly in the window), v_k anywhere (at least ``far_min_gap`` seconds from v_i
when set). v_i / v_j double as MCL's query / key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from mohico.datasets.load.crops import (box_coverage, crop_resize_maps, hot_mask, min_crop_side,  # noqa: F401
                                        motion_crop_box, motion_crop_candidates, pixel_box, random_resized_crop)


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


# --------------------------------------------------------------------------- temporal
def gradual_delta(progress: float, delta: float) -> float:
    """HiCo's ``delta_max(alpha) = alpha / alpha_max * Delta`` with ``progress = alpha / alpha_max``.

    ``progress`` is clipped to [0, 1]; the result is in seconds (centre to centre).
    """
    return float(min(max(float(progress), 0.0), 1.0) * float(delta))


def video_stride(frame_stride: int, reference_fps: float, fps: float) -> float:
    """Frames of a video at ``fps`` between two frames of a clip: ``frame_stride`` counted at
    ``reference_fps`` (``frame_stride * fps / reference_fps``), or ``frame_stride`` stored frames
    when ``reference_fps`` is 0. Fractional results are resampled by frame index
    (:func:`clip_offsets`), so a clip spans the same seconds whatever fps the shards were written at.
    """
    if float(reference_fps) <= 0:
        return float(frame_stride)
    return float(frame_stride) * float(fps) / float(reference_fps)


def clip_offsets(clip_len: int, stride: float) -> np.ndarray:
    """Offsets of a clip's frames from its start, ``(T,)`` int64: ``t * stride`` rounded half up.

    An integer stride gives ``arange(T) * stride``; a fractional one takes the nearest stored frame
    to each wanted time (below 1, frames repeat: a video whose fps cannot serve the rate is
    resampled, never stretched in time).
    """
    return np.floor(np.arange(int(clip_len)) * float(stride) + 0.5).astype(np.int64)


def clip_span(clip_len: int, stride: float) -> int:
    """Frames covered by one clip, first to last inclusive."""
    return int(clip_offsets(clip_len, stride)[-1]) + 1


def max_start(num_frames: int, clip_len: int, stride: float) -> int:
    """Largest start that keeps the clip inside the video (0 for too-short videos)."""
    return max(int(num_frames) - clip_span(clip_len, stride), 0)


def clip_frames(start: int, clip_len: int, stride: float, num_frames: int) -> np.ndarray:
    """Frame indices of one clip, ``(T,)`` int64, clamped to the last frame."""
    return np.minimum(int(start) + clip_offsets(clip_len, stride), int(num_frames) - 1)


def cut_free_starts(num_frames: int, clip_len: int, stride: float, cuts: Sequence[int]) -> np.ndarray:
    """Valid starts whose clip spans no shot cut, ``(k,)`` int64 (possibly empty).

    ``cuts``: first frame of each new shot (``meta["cuts"]``); a clip ``[s, s + span - 1]`` spans
    cut ``c`` when ``s < c <= s + span - 1`` (it holds frames of both shots).
    """
    span = clip_span(clip_len, stride)
    starts = np.arange(max_start(num_frames, clip_len, stride) + 1)
    c = np.asarray(sorted(int(x) for x in cuts), dtype=np.int64)
    if len(c) == 0:
        return starts
    # first cut after each start; the clip is clean when that cut lies beyond its last frame
    nxt = np.searchsorted(c, starts, side="right")
    first_after = np.where(nxt < len(c), c[np.minimum(nxt, len(c) - 1)], np.iinfo(np.int64).max)
    return starts[first_after > starts + span - 1]


def clip_scores(tmotion: np.ndarray, clip_len: int, stride: float) -> np.ndarray:
    """Mean T-motion of every candidate clip: ``scores[s]`` for each valid start ``s``.

    tmotion: ``(N,)`` per-frame T-motion. Returns ``(max_start + 1,)`` float64.
    """
    tm = np.asarray(tmotion, dtype=np.float64).reshape(-1)
    n = tm.shape[0]
    starts = np.arange(max_start(n, clip_len, stride) + 1)
    idx = np.minimum(starts[:, None] + clip_offsets(clip_len, stride)[None, :], n - 1)
    return tm[idx].mean(axis=1)


def high_motion_starts(scores: np.ndarray) -> np.ndarray:
    """Starts whose score is at or above the median of all candidate scores (never empty).

    When the median equals the minimum (most clips equally static, e.g. zero motion), the clips
    at the median are the static ones: then only clips strictly above it are kept, if any.
    """
    med = np.median(scores)
    if med <= scores.min() and (scores > med).any():
        return np.flatnonzero(scores > med)
    return np.flatnonzero(scores >= med)


def mcl_starts(tmotion: np.ndarray, clip_len: int, stride: float, rng: np.random.Generator,
               p: float = 0.7, n: int = 2, candidates: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, bool]:
    """MCL motion-focused temporal sampling: ``n`` clip starts (query, key, ...).

    With probability ``p`` every start is drawn uniformly among the candidates scoring at or
    above the median candidate score; otherwise uniformly among all candidates. ``candidates``:
    the starts allowed (default: every valid start; e.g. :func:`cut_free_starts`). Returns
    ``(starts (n,) int64, focused)``.
    """
    scores = clip_scores(tmotion, clip_len, stride)
    pool = np.arange(scores.shape[0]) if candidates is None or len(candidates) == 0 else np.asarray(candidates)
    focused = bool(rng.random() < p)
    if focused:
        pool = pool[high_motion_starts(scores[pool])]
    return rng.choice(pool, size=n, replace=True).astype(np.int64), focused


def top_ranked(pool: np.ndarray, scores: np.ndarray, share: float = 0.5) -> np.ndarray:
    """The ``int(len(pool) * share) + 1`` members of ``pool`` with the highest ``scores[pool]``
    (ties: the earlier start first), as the official MCL code keeps them within a half
    (``num_max = int(len(idxs) * threshold) + 1``)."""
    order = np.argsort(-scores[pool], kind="stable")
    return pool[order[:int(len(pool) * share) + 1]]


def mcl_half_starts(tmotion: np.ndarray, clip_len: int, stride: float, rng: np.random.Generator,
                    p: float = 0.7, n_keys: int = 1, candidates: Optional[np.ndarray] = None
                    ) -> Optional[tuple[np.ndarray, bool]]:
    """MCL's temporal sampling as the official code draws it: the query from one half of the
    video and ``n_keys`` keys from the other half, so the positive is never the query's clip nor
    overlaps it.

    The video's valid starts are split at ``mid = num_frames // 2``: the first half holds the
    clips that end before ``mid``, the second those that start at or after it. Which half holds
    the query is a fair coin. With probability ``p`` each half keeps only its top-ranked clips by
    mean T-motion (:func:`top_ranked`, the top ``int(n * 0.5) + 1``); otherwise the whole half.
    The query is uniform in its half; the keys uniform in the other, each new key among the
    clips overlapping no earlier key when there are such clips. ``candidates`` (e.g.
    :func:`cut_free_starts`) restricts both halves when each keeps some of them.

    Returns ``(starts (1 + n_keys,) int64: query first, focused)``, or None when the video is
    too short to hold one clip in each half (``num_frames < 2 * clip_span``): the caller then
    draws from the pool (:func:`mcl_starts`) and counts the video.
    """
    scores = clip_scores(tmotion, clip_len, stride)
    n, span = len(np.asarray(tmotion).reshape(-1)), clip_span(clip_len, stride)
    mid = n // 2
    every = np.arange(scores.shape[0])
    halves = [every[every + span <= mid], every[every >= mid]]
    if candidates is not None and len(candidates):
        kept = [np.intersect1d(h, candidates) for h in halves]
        if all(len(k) for k in kept):
            halves = kept
    if not all(len(h) for h in halves):
        return None
    focused = bool(rng.random() < p)
    if focused:
        halves = [top_ranked(h, scores) for h in halves]
    if rng.random() < 0.5:                       # which half holds the query
        halves = halves[::-1]
    query = int(rng.choice(halves[0]))
    keys: list[int] = []
    for _ in range(int(n_keys)):
        free = np.array([s for s in halves[1] if all(abs(int(s) - k) >= span for k in keys)], dtype=np.int64)
        keys.append(int(rng.choice(free if len(free) else halves[1])))
    return np.array([query, *keys], dtype=np.int64), focused


def _near(pool: np.ndarray, anchor: int, radius_frames: float) -> np.ndarray:
    """Members of ``pool`` whose distance to ``anchor`` is < radius (``anchor`` itself always)."""
    d = np.abs(pool - anchor)
    return pool[(d < radius_frames) | (d == 0)]


def hico_starts(num_frames: int, fps: float, clip_len: int, stride: float, delta_max: float,
                rng: np.random.Generator, far_min_gap: float = 0.0,
                anchor_pool: Optional[np.ndarray] = None, near_pool: Optional[np.ndarray] = None,
                candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """HiCo's three clip starts ``(v_i, v_j, v_k)``, ``(3,)`` int64.

    ``candidates``: the starts allowed (default: every valid start; e.g. :func:`cut_free_starts`).
    - v_i uniform among ``anchor_pool`` (default: all candidates);
    - v_j with ``|c_i - c_j| < delta_max`` seconds (at ``delta_max == 0``: ``v_j = v_i``), drawn
      among ``near_pool`` members of that window when there are any, else the candidates in it;
    - v_k uniform over the candidates, at least ``far_min_gap`` seconds from v_i when that is > 0
      (the farthest candidate when none is that far).
    """
    s_max = max_start(num_frames, clip_len, stride)
    every = np.arange(s_max + 1) if candidates is None or len(candidates) == 0 else np.asarray(candidates)
    pool_i = every if anchor_pool is None or len(anchor_pool) == 0 else np.asarray(anchor_pool)
    s_i = int(rng.choice(pool_i))
    radius = float(delta_max) * float(fps)           # centre distance in frames = start distance
    window = _near(every, s_i, radius)
    if len(window) == 0:                             # v_i outside the candidates (anchor_pool given)
        window = np.array([s_i])
    if near_pool is not None:
        focused = _near(np.asarray(near_pool), s_i, radius)
        if len(focused):
            window = focused
    s_j = int(rng.choice(window))
    if far_min_gap > 0:
        far = every[np.abs(every - s_i) >= far_min_gap * fps]
        s_k = int(rng.choice(far)) if len(far) else int(every[np.argmax(np.abs(every - s_i))])
    else:
        s_k = int(rng.choice(every))
    return np.array([s_i, s_j, s_k], dtype=np.int64)


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
                box, method = motion_crop_box(
                    maps_all.mean(axis=0), self.s.crop_percentile, self.s.crop_coverage, rng,
                    self.s.crop_area, self.s.crop_aspect, self.s.crop_max_sizes,
                    self.s.crop_max_positions)
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
