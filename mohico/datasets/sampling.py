"""Which frames and which box: HiCo gradual and MCL motion-focused sampling (pure numpy).

Everything here is deterministic given a ``numpy.random.Generator``; the loader derives one
per sample occurrence with :func:`sample_rng` from ``(seed, epoch, rank, key)``, so the same
sample in the same epoch always gets the same clips, boxes and augmentation draws, whatever the
number of loader workers or the timing of the run.

Conventions
- A clip is ``clip_len`` frames at ``stride``: ``frames = start + arange(T) * stride``; it spans
  ``clip_span = (T - 1) * stride + 1`` frames and must lie wholly inside the video, so
  ``0 <= start <= num_frames - clip_span``. Videos shorter than one span give start 0 and the
  indices are clamped to the last frame (the clip repeats its last frame).
- Clip centres are in seconds: ``c = (start + (clip_span - 1) / 2) / fps``.
- Boxes are ``(x, y, w, h)`` floats in the coordinates of the map they were computed on
  (motion-grid cells); :meth:`ClipSampler.sample` also returns them in stored-frame pixels,
  rounded to whole pixels so that the decoder and the motion targets use exactly the same box.

Views (``ClipSampler``): V = 2 with only MCL (query, key); V = 3 when HiCo is on
(v_i, v_j, v_k). With both on, v_i is drawn motion-focused (with probability ``motion_prob``
among the clips at or above the median clip score, else uniformly), v_j within ``delta_max`` of
v_i (among the high-motion starts of that window when the draw is motion-focused and the window
has any, else uniformly in the window), v_k anywhere (at least ``far_min_gap`` seconds from v_i
when set). v_i / v_j double as MCL's query / key.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


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


def clip_span(clip_len: int, stride: int) -> int:
    """Frames covered by one clip, first to last inclusive."""
    return (int(clip_len) - 1) * int(stride) + 1


def max_start(num_frames: int, clip_len: int, stride: int) -> int:
    """Largest start that keeps the clip inside the video (0 for too-short videos)."""
    return max(int(num_frames) - clip_span(clip_len, stride), 0)


def clip_frames(start: int, clip_len: int, stride: int, num_frames: int) -> np.ndarray:
    """Frame indices of one clip, ``(T,)`` int64, clamped to the last frame."""
    idx = int(start) + np.arange(int(clip_len), dtype=np.int64) * int(stride)
    return np.minimum(idx, int(num_frames) - 1)


def clip_scores(tmotion: np.ndarray, clip_len: int, stride: int) -> np.ndarray:
    """Mean T-motion of every candidate clip: ``scores[s]`` for each valid start ``s``.

    tmotion: ``(N,)`` per-frame T-motion. Returns ``(max_start + 1,)`` float64.
    """
    tm = np.asarray(tmotion, dtype=np.float64).reshape(-1)
    n = tm.shape[0]
    starts = np.arange(max_start(n, clip_len, stride) + 1)
    idx = np.minimum(starts[:, None] + np.arange(clip_len)[None, :] * stride, n - 1)
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


def mcl_starts(tmotion: np.ndarray, clip_len: int, stride: int, rng: np.random.Generator,
               p: float = 0.7, n: int = 2) -> tuple[np.ndarray, bool]:
    """MCL motion-focused temporal sampling: ``n`` clip starts (query, key, ...).

    With probability ``p`` every start is drawn uniformly among the candidates scoring at or
    above the median score; otherwise uniformly among all valid starts. Returns
    ``(starts (n,) int64, focused)``.
    """
    scores = clip_scores(tmotion, clip_len, stride)
    focused = bool(rng.random() < p)
    pool = high_motion_starts(scores) if focused else np.arange(scores.shape[0])
    return rng.choice(pool, size=n, replace=True).astype(np.int64), focused


def _near(pool: np.ndarray, anchor: int, radius_frames: float) -> np.ndarray:
    """Members of ``pool`` whose distance to ``anchor`` is < radius (``anchor`` itself always)."""
    d = np.abs(pool - anchor)
    return pool[(d < radius_frames) | (d == 0)]


def hico_starts(num_frames: int, fps: float, clip_len: int, stride: int, delta_max: float,
                rng: np.random.Generator, far_min_gap: float = 0.0,
                anchor_pool: Optional[np.ndarray] = None, near_pool: Optional[np.ndarray] = None
                ) -> np.ndarray:
    """HiCo's three clip starts ``(v_i, v_j, v_k)``, ``(3,)`` int64.

    - v_i uniform among ``anchor_pool`` (default: all valid starts);
    - v_j with ``|c_i - c_j| < delta_max`` seconds (at ``delta_max == 0``: ``v_j = v_i``), drawn
      among ``near_pool`` members of that window when there are any, else the whole window;
    - v_k uniform over the video, at least ``far_min_gap`` seconds from v_i when that is > 0
      (the farthest start when no start is that far).
    """
    s_max = max_start(num_frames, clip_len, stride)
    every = np.arange(s_max + 1)
    pool_i = every if anchor_pool is None or len(anchor_pool) == 0 else np.asarray(anchor_pool)
    s_i = int(rng.choice(pool_i))
    radius = float(delta_max) * float(fps)           # centre distance in frames = start distance
    window = _near(every, s_i, radius)
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


# --------------------------------------------------------------------------- spatial
def random_resized_crop(height: float, width: float, rng: np.random.Generator,
                        area: Sequence[float] = (0.2, 1.0),
                        aspect: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10
                        ) -> tuple[float, float, float, float]:
    """torchvision-style random resized crop box ``(x, y, w, h)`` inside ``height x width``."""
    total = float(height) * float(width)
    log_ar = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(attempts):
        a = total * rng.uniform(area[0], area[1])
        ar = math.exp(rng.uniform(*log_ar))
        w, h = math.sqrt(a * ar), math.sqrt(a / ar)
        if w <= width and h <= height:
            return (float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h)
    # centre crop at the closest allowed aspect
    ratio = width / height
    if ratio < aspect[0]:
        w, h = width, width / aspect[0]
    elif ratio > aspect[1]:
        w, h = height * aspect[1], height
    else:
        w, h = width, height
    return ((width - w) / 2, (height - h) / 2, float(w), float(h))


def hot_mask(s_motion: np.ndarray, percentile: float = 90.0) -> np.ndarray:
    """Cells strictly above the ``percentile`` of the map (empty for a flat map)."""
    s = np.asarray(s_motion, dtype=np.float64)
    thr = np.percentile(s, percentile)
    hot = s > thr
    if not hot.any() and thr > s.min():      # ties at the threshold: take them
        hot = s >= thr
    return hot


def box_coverage(hot: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of the hot cells' area inside each box.

    hot: ``(H, W)`` bool; boxes: ``(..., 4)`` as (x, y, w, h) in cell units (cell ``(r, c)``
    spans ``[c, c + 1) x [r, r + 1)``). Returns ``boxes.shape[:-1]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    ys, xs = np.nonzero(hot)
    if len(xs) == 0:
        return np.zeros(boxes.shape[:-1])
    x0, y0 = boxes[..., 0:1], boxes[..., 1:2]
    x1, y1 = x0 + boxes[..., 2:3], y0 + boxes[..., 3:4]
    ox = np.clip(np.minimum(x1, xs + 1.0) - np.maximum(x0, xs), 0.0, 1.0)
    oy = np.clip(np.minimum(y1, ys + 1.0) - np.maximum(y0, ys), 0.0, 1.0)
    return (ox * oy).sum(axis=-1) / len(xs)


def motion_crop_box(s_motion: np.ndarray, percentile: float = 90.0, coverage: float = 0.8,
                    rng: Optional[np.random.Generator] = None,
                    area: Sequence[float] = (0.2, 1.0), aspect: Sequence[float] = (3 / 4, 4 / 3),
                    max_sizes: int = 20, max_positions: int = 40, allow_full: bool = False
                    ) -> tuple[tuple[float, float, float, float], str]:
    """MCL's motion-focused crop (methods.md §1.2) on an S-motion map.

    s_motion: ``(H, W)`` map (cells assumed square in pixels). Draws ``max_sizes`` sizes
    (area fraction ~ U(area), log-uniform aspect) and ``max_positions`` random positions each;
    sizes are tried from the smallest area up and the first box whose coverage of the hot cells
    (those above the ``percentile``) reaches ``coverage`` is returned, so the box focuses on
    the motion. The whole frame is never a candidate unless ``allow_full``. When no box
    qualifies (or the map is flat), a plain random resized crop is returned.

    Returns ``((x, y, w, h), method)`` with method ``"motion"`` or ``"random"``; the box is in
    the map's coordinates (floats, cell units).
    """
    rng = np.random.default_rng() if rng is None else rng
    s = np.asarray(s_motion, dtype=np.float64)
    H, W = s.shape
    hot = hot_mask(s, percentile)
    if hot.any():
        a = rng.uniform(area[0], area[1], size=max_sizes) * H * W
        ar = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), size=max_sizes))
        ws, hs = np.sqrt(a * ar), np.sqrt(a / ar)
        fx = rng.random((max_sizes, max_positions))
        fy = rng.random((max_sizes, max_positions))
        ok = (ws <= W + 1e-9) & (hs <= H + 1e-9)
        if not allow_full:
            ok &= ~((ws >= W - 1e-6) & (hs >= H - 1e-6))
        if ok.any():
            ws, hs, fx, fy, a = ws[ok], hs[ok], fx[ok], fy[ok], a[ok]
            order = np.argsort(a, kind="stable")
            ws, hs, fx, fy = ws[order], hs[order], fx[order], fy[order]
            xs = fx * np.maximum(W - ws, 0.0)[:, None]
            ys = fy * np.maximum(H - hs, 0.0)[:, None]
            boxes = np.stack([xs, ys, np.broadcast_to(ws[:, None], xs.shape),
                              np.broadcast_to(hs[:, None], xs.shape)], axis=-1)
            cov = box_coverage(hot, boxes)                         # (sizes, positions)
            good = np.argwhere(cov >= coverage - 1e-12)
            if len(good):
                i, j = good[0]                                     # smallest size, first position
                return tuple(float(v) for v in boxes[i, j]), "motion"
    return random_resized_crop(H, W, rng, area, aspect), "random"


def crop_resize_maps(maps: np.ndarray, box: Sequence[float], out_hw: Sequence[int],
                     flip: bool = False) -> np.ndarray:
    """Cut ``box`` out of each map and resize it bilinearly (MAL targets).

    maps: ``(T, H, W)``; box (x, y, w, h) in map cells; returns ``(T, oh, ow)`` float32, mirrored
    left-right when ``flip``. Output cell centres are sampled inside the box (half-pixel
    convention, edge clamped), like a crop followed by a linear resize of the frames.
    """
    maps = np.asarray(maps, dtype=np.float32)
    _, H, W = maps.shape
    oh, ow = int(out_hw[0]), int(out_hw[1])
    x, y, w, h = (float(v) for v in box)
    u = np.clip(x + (np.arange(ow) + 0.5) * (w / ow) - 0.5, 0, W - 1)
    v = np.clip(y + (np.arange(oh) + 0.5) * (h / oh) - 0.5, 0, H - 1)
    u0 = np.floor(u).astype(np.int64); u1 = np.minimum(u0 + 1, W - 1); fu = (u - u0).astype(np.float32)
    v0 = np.floor(v).astype(np.int64); v1 = np.minimum(v0 + 1, H - 1); fv = (v - v0).astype(np.float32)
    top = maps[:, v0][:, :, u0] * (1 - fu) + maps[:, v0][:, :, u1] * fu
    bot = maps[:, v1][:, :, u0] * (1 - fu) + maps[:, v1][:, :, u1] * fu
    out = top * (1 - fv)[None, :, None] + bot * fv[None, :, None]
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


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

    def __init__(self, sampling, data, mcl: bool, hico: bool):
        if not (mcl or hico):
            raise ValueError("ClipSampler needs MCL or HiCo enabled")
        self.s, self.d, self.mcl, self.hico = sampling, data, bool(mcl), bool(hico)
        self.progress = 0.0

    @property
    def num_views(self) -> int:
        return 3 if self.hico else 2

    def set_progress(self, progress: float) -> None:
        self.progress = min(max(float(progress), 0.0), 1.0)

    def delta_max(self, progress: Optional[float] = None) -> float:
        p = self.progress if progress is None else progress
        return gradual_delta(p, self.s.delta) if self.s.gradual else float(self.s.delta)

    def temporal(self, meta: dict, rng: np.random.Generator, progress: Optional[float] = None
                 ) -> tuple[np.ndarray, bool, float]:
        """Clip starts ``(V,)``, whether the draw was motion-focused, and delta_max."""
        T, stride = self.d.clip_len, self.d.frame_stride
        n = int(meta["num_frames"])
        fps = float(meta["fps"])
        tm = meta.get("tmotion")
        dmax = self.delta_max(progress)
        if self.mcl and tm is not None and len(tm):
            tm = np.nan_to_num(np.asarray(tm, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            tm = tm[:n] if len(tm) >= n else np.pad(tm, (0, n - len(tm)), mode="edge")
            if not self.hico:
                starts, focused = mcl_starts(tm, T, stride, rng, self.s.motion_prob, n=2)
                return starts, focused, dmax
            focused = bool(rng.random() < self.s.motion_prob)
            high = high_motion_starts(clip_scores(tm, T, stride)) if focused else None
            return hico_starts(n, fps, T, stride, dmax, rng, self.s.far_min_gap,
                               anchor_pool=high, near_pool=high), focused, dmax
        if self.hico:
            return hico_starts(n, fps, T, stride, dmax, rng, self.s.far_min_gap), False, dmax
        every = np.arange(max_start(n, T, stride) + 1)
        return rng.choice(every, size=2).astype(np.int64), False, dmax

    def sample(self, meta: dict, motion: Optional[np.ndarray], rng: np.random.Generator,
               progress: Optional[float] = None) -> SampleDraw:
        """All views of one video.

        meta: the shard's json (``num_frames, fps, width, height, tmotion, motion.scale``);
        motion: ``(N, gh, gw)`` uint8 motion maps or None (flat maps: random crops, zero
        targets).
        """
        T, stride = self.d.clip_len, self.d.frame_stride
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


def pixel_box(box: Sequence[float], sx: float, sy: float, width: int, height: int
              ) -> tuple[int, int, int, int]:
    """A map-cell box scaled to pixels and rounded to whole pixels inside the frame."""
    x0 = int(round(box[0] * sx)); y0 = int(round(box[1] * sy))
    x1 = int(round((box[0] + box[2]) * sx)); y1 = int(round((box[1] + box[3]) * sy))
    x0 = min(max(x0, 0), width - 1); y0 = min(max(y0, 0), height - 1)
    x1 = min(max(x1, x0 + 1), width); y1 = min(max(y1, y0 + 1), height)
    return (x0, y0, x1 - x0, y1 - y0)
