"""Which box: random resized crops, MCL's motion-focused crop, and motion targets cut to a box (numpy).

Boxes are ``(x, y, w, h)`` floats in the coordinates of the map they were computed on (motion-grid
cells for :func:`motion_crop_box`, pixels for :func:`random_resized_crop` on a frame's size);
:func:`pixel_box` rounds a cell box to whole stored-frame pixels. ``area`` ranges are fractions of
the map's (frame's) area, ``aspect`` ranges are w / h. :func:`min_crop_side` is the shortest side
any of these crops can have, which the loader compares with ``data.crop_size``.

MCL's crop comes in two rules (``sampling.crop_rule``, docs/METHODS.md section 1.2):
:func:`official_crop_box` (the released code's rule: the top cells of a 7 x 7 grid give a box that
the crop must cover in part) and :func:`motion_crop_box` (the percentile rule: the crop must hold
a share of the cells above a percentile of the map).
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
    """MCL's motion-focused crop (docs/METHODS.md section 1.2) on an S-motion map, the percentile rule.

    s_motion: ``(H, W)`` map (cells assumed square in pixels). The candidates of
    :func:`motion_crop_candidates` (``max_sizes`` random sizes in the order drawn, ``max_positions``
    random positions each) are tried in order; the first box whose coverage of the hot cells
    (those above the ``percentile``) reaches ``coverage`` is returned, else the candidate with the
    best coverage (the first of equals). The crop's scale therefore keeps its random draw: on a
    map whose hot cells any box covers, the area is ~U(area) (restricted to sizes that fit). The
    whole frame is never a candidate unless ``allow_full``. A flat map (no hot cells) or no size
    that fits gives a plain random resized crop. (The released code tries the positions of the
    first size that fits only, and scores them on the box of its top cells: :func:`official_crop_box`.)

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


# --------------------------------------------------------------------------- the official rule
OFFICIAL_GRID = 7              # the official code's S-motion grid (7 x 7 over the frame)
OFFICIAL_TOP_FRACTION = 0.1    # its hot cells: the top floor(7 * 7 * 0.1) = 4 cells
OFFICIAL_COVERAGE = ((4, 0.9), (8, 0.8), (12, 0.7))   # (top-cell box area in cells <=, coverage needed)


def pool_grid(s_motion: np.ndarray, rows: int = OFFICIAL_GRID, cols: int = OFFICIAL_GRID) -> np.ndarray:
    """Area-weighted block means of an ``(H, W)`` map on a ``rows x cols`` grid over the same extent.

    Output cell ``(i, j)`` is the mean of the map over ``[j W / cols, (j + 1) W / cols) x
    [i H / rows, (i + 1) H / rows)``, input cells counted by the fraction of them inside (so any
    ``H, W`` works, smaller than the grid too). Returns ``(rows, cols)`` float64.
    """
    s = np.asarray(s_motion, dtype=np.float64)

    def weights(n_in: int, n_out: int) -> np.ndarray:      # (n_out, n_in): overlap of out cell i with in cell k
        edges = np.arange(n_out + 1) * (n_in / n_out)
        k = np.arange(n_in)
        w = np.clip(np.minimum(edges[1:, None], k + 1.0) - np.maximum(edges[:-1, None], k), 0.0, None)
        return w / w.sum(axis=1, keepdims=True)

    return weights(s.shape[0], rows) @ s @ weights(s.shape[1], cols).T


def top_cell_box(grid: np.ndarray, fraction: float = OFFICIAL_TOP_FRACTION
                 ) -> tuple[tuple[float, float, float, float], float]:
    """The official code's motion box and the coverage it asks for (``get_cor``).

    grid: ``(h, w)`` pooled S-motion. Its top ``floor(h * w * fraction)`` cells (ties: the later cell
    in row-major order first, as ``argsort(...)[::-1]``) span a bounding box of ``c`` cells; the
    coverage needed is 0.9 / 0.8 / 0.7 for ``c <= 4 / 8 / 12`` and 0 (no motion box: a plain random
    resized crop) above. Returns ``((x, y, w, h), coverage)``, the box in grid cells.
    """
    g = np.asarray(grid, dtype=np.float64)
    h, w = g.shape
    k = max(1, int(math.floor(h * w * fraction)))
    idx = np.argsort(g.reshape(-1), kind="stable")[::-1][:k]
    rows, cols = idx // w, idx % w
    x0, y0, x1, y1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    cells = int((x1 - x0) * (y1 - y0))
    need = next((cov for limit, cov in OFFICIAL_COVERAGE if cells <= limit), 0.0)
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), need


def rect_coverage(target: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """Fraction of the ``target`` rectangle's area inside each box (the official ``ratio_row *
    ratio_col``). target ``(x, y, w, h)``; boxes ``(..., 4)``; returns ``boxes.shape[:-1]``."""
    tx, ty, tw, th = (float(v) for v in target)
    b = np.asarray(boxes, dtype=np.float64)
    ox = np.clip(np.minimum(b[..., 0] + b[..., 2], tx + tw) - np.maximum(b[..., 0], tx), 0.0, None)
    oy = np.clip(np.minimum(b[..., 1] + b[..., 3], ty + th) - np.maximum(b[..., 1], ty), 0.0, None)
    return (ox / tw) * (oy / th)


def official_crop_box(s_motion: np.ndarray, rng: np.random.Generator,
                      area: Sequence[float] = (0.2, 1.0), aspect: Sequence[float] = (3 / 4, 4 / 3),
                      max_sizes: int = 20, max_positions: int = 40
                      ) -> tuple[tuple[float, float, float, float], str]:
    """MCL's motion-focused crop as the released code draws it (``ClipRandomResizedCropMotion``).

    s_motion: ``(H, W)`` S-motion map (cells assumed square in pixels). It is pooled to the 7 x 7
    grid (:func:`pool_grid`); :func:`top_cell_box` gives the box of its top 4 cells and the coverage
    needed. Up to ``max_sizes`` sizes are drawn (area fraction ~ U(area), log-uniform aspect); the
    first that fits the map (the whole map included) gets up to ``max_positions`` uniform positions,
    and the first position whose crop covers the needed fraction of the top-cell box is taken, else
    the best of those positions (the first of equals). Later sizes are drawn only while a size does
    not fit. No size fits: a box from a random point up-left of the top-cell box to its far corner,
    or from its near corner to a random point down-right (a fair coin; ``crop_from_corners``).
    A top-cell box of more than 12 cells, or a flat map (no motion), gives a plain random resized crop.

    Returns ``((x, y, w, h), method)`` with method ``"motion"`` or ``"random"``, the box in map cells.
    """
    s = np.asarray(s_motion, dtype=np.float64)
    H, W = s.shape
    if not s.max() > s.min():
        return random_resized_crop(H, W, rng, area, aspect), "random"
    (gx, gy, gw, gh), need = top_cell_box(pool_grid(s))
    if need == 0.0:
        return random_resized_crop(H, W, rng, area, aspect, attempts=max_sizes), "random"
    sx, sy = W / OFFICIAL_GRID, H / OFFICIAL_GRID
    target = (gx * sx, gy * sy, gw * sx, gh * sy)
    a = rng.uniform(area[0], area[1], size=max_sizes) * H * W
    ar = np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]), size=max_sizes))
    ws, hs = np.sqrt(a * ar), np.sqrt(a / ar)
    fits = np.flatnonzero((ws <= W + 1e-9) & (hs <= H + 1e-9))
    if len(fits):
        w, h = min(float(ws[fits[0]]), W), min(float(hs[fits[0]]), H)
        pos = rng.random((max_positions, 2)) * np.array([W - w, H - h])
        boxes = np.column_stack([pos, np.full(max_positions, w), np.full(max_positions, h)])
        cov = rect_coverage(target, boxes)
        good = np.flatnonzero(cov >= need - 1e-12)
        k = int(good[0]) if len(good) else int(np.argmax(cov))
        return tuple(float(v) for v in boxes[k]), "motion"
    x0, y0, x1, y1 = target[0], target[1], target[0] + target[2], target[1] + target[3]
    if rng.random() < 0.5:
        x0, y0 = rng.uniform(0.0, x0), rng.uniform(0.0, y0)
    else:
        x1, y1 = rng.uniform(x1, W), rng.uniform(y1, H)
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), "motion"


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
