"""Which box: random resized crops, MCL's motion-focused crop, and motion targets cut to a box (numpy).

Boxes are ``(x, y, w, h)`` floats in the coordinates of the map they were computed on (motion-grid
cells for :func:`motion_crop_box`, pixels for :func:`random_resized_crop` on a frame's size);
:func:`pixel_box` rounds a cell box to whole stored-frame pixels. ``area`` ranges are fractions of
the map's (frame's) area, ``aspect`` ranges are w / h. :func:`min_crop_side` is the shortest side
any of these crops can have, which the loader compares with ``data.crop_size``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


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


def motion_crop_candidates(shape: Sequence[int], rng: np.random.Generator,
                           area: Sequence[float] = (0.2, 1.0), aspect: Sequence[float] = (3 / 4, 4 / 3),
                           max_sizes: int = 20, max_positions: int = 40, allow_full: bool = False
                           ) -> np.ndarray:
    """The candidate boxes of :func:`motion_crop_box`, in the order they are tried.

    ``max_sizes`` sizes (area fraction ~ U(area), log-uniform aspect) in the order drawn, each
    with ``max_positions`` uniform positions; sizes that do not fit the ``(H, W)`` map (or cover
    all of it, unless ``allow_full``) are dropped. Returns ``(sizes_kept, max_positions, 4)``
    float64 (x, y, w, h) in cell units; the rng stream does not depend on the map's content.
    """
    H, W = int(shape[0]), int(shape[1])
    a = rng.uniform(area[0], area[1], size=max_sizes) * H * W
    ar = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), size=max_sizes))
    ws, hs = np.sqrt(a * ar), np.sqrt(a / ar)
    fx = rng.random((max_sizes, max_positions))
    fy = rng.random((max_sizes, max_positions))
    ok = (ws <= W + 1e-9) & (hs <= H + 1e-9)
    if not allow_full:
        ok &= ~((ws >= W - 1e-6) & (hs >= H - 1e-6))
    ws, hs, fx, fy = ws[ok], hs[ok], fx[ok], fy[ok]
    xs = fx * np.maximum(W - ws, 0.0)[:, None]
    ys = fy * np.maximum(H - hs, 0.0)[:, None]
    return np.stack([xs, ys, np.broadcast_to(ws[:, None], xs.shape),
                     np.broadcast_to(hs[:, None], xs.shape)], axis=-1)


def motion_crop_box(s_motion: np.ndarray, percentile: float = 90.0, coverage: float = 0.8,
                    rng: Optional[np.random.Generator] = None,
                    area: Sequence[float] = (0.2, 1.0), aspect: Sequence[float] = (3 / 4, 4 / 3),
                    max_sizes: int = 20, max_positions: int = 40, allow_full: bool = False
                    ) -> tuple[tuple[float, float, float, float], str]:
    """MCL's motion-focused crop (docs/METHODS.md section 1.2) on an S-motion map, the official rule.

    s_motion: ``(H, W)`` map (cells assumed square in pixels). The candidates of
    :func:`motion_crop_candidates` (``max_sizes`` random sizes in the order drawn, ``max_positions``
    random positions each) are tried in order; the first box whose coverage of the hot cells
    (those above the ``percentile``) reaches ``coverage`` is returned, else the candidate with the
    best coverage (the first of equals). The crop's scale therefore keeps its random draw: on a
    map whose hot cells any box covers, the area is ~U(area) (restricted to sizes that fit). The
    whole frame is never a candidate unless ``allow_full``. A flat map (no hot cells) or no size
    that fits gives a plain random resized crop.

    Returns ``((x, y, w, h), method)`` with method ``"motion"`` or ``"random"``; the box is in
    the map's coordinates (floats, cell units).
    """
    rng = np.random.default_rng() if rng is None else rng
    s = np.asarray(s_motion, dtype=np.float64)
    H, W = s.shape
    hot = hot_mask(s, percentile)
    if hot.any():
        boxes = motion_crop_candidates((H, W), rng, area, aspect, max_sizes, max_positions, allow_full)
        if boxes.shape[0]:
            cov = box_coverage(hot, boxes).reshape(-1)             # size-major: the order tried
            good = np.flatnonzero(cov >= coverage - 1e-12)
            k = int(good[0]) if len(good) else int(np.argmax(cov))
            return tuple(float(v) for v in boxes.reshape(-1, 4)[k]), "motion"
    return random_resized_crop(H, W, rng, area, aspect), "random"


def min_crop_side(short_side: float, area: Sequence[float], aspect: Sequence[float]) -> float:
    """The shortest side (pixels) a crop of at least ``area[0]`` of the frame can have.

    Taken on a 4:3 frame of the given short side (the narrowest landscape frame the shards hold in
    practice; wider frames give larger crops): a box of area ``a * H * W`` at aspect ``r`` has
    sides ``sqrt(a H W r)`` and ``sqrt(a H W / r)``; the worst aspect in the range gives the bound
    ``H * sqrt(a * 4/3 * min(r_min, 1 / r_max))``, capped by the frame's short side.
    """
    H = float(short_side)
    worst = min(float(aspect[0]), 1.0 / float(aspect[1]))
    return min(H, H * math.sqrt(float(area[0]) * 4.0 / 3.0 * worst))


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



def pixel_box(box: Sequence[float], sx: float, sy: float, width: int, height: int
              ) -> tuple[int, int, int, int]:
    """A map-cell box scaled to pixels and rounded to whole pixels inside the frame."""
    x0 = int(round(box[0] * sx)); y0 = int(round(box[1] * sy))
    x1 = int(round((box[0] + box[2]) * sx)); y1 = int(round((box[1] + box[3]) * sy))
    x0 = min(max(x0, 0), width - 1); y0 = min(max(y0, 0), height - 1)
    x1 = min(max(x1, x0 + 1), width); y1 = min(max(y1, y0 + 1), height)
    return (x0, y0, x1 - x0, y1 - y0)
