"""Which frames: clip geometry and the temporal draws of MCL and HiCo (pure numpy).

Every function takes the ``numpy.random.Generator`` it draws from (:func:`mohico.datasets.load.sampling.sample_rng`
derives one per sample occurrence), so a draw is deterministic. :class:`mohico.datasets.load.sampling.ClipSampler`
puts these together per video; the names are re-exported from :mod:`mohico.datasets.load.sampling`.

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

MCL alone draws its query and key (``sampling.mcl_temporal``) either as the official code does,
from different halves of the video (``halves``, :func:`mcl_half_starts`: the positive never is,
nor overlaps, the query's clip; a video too short for two clips falls back to the pool draw and is
counted as ``data/mcl_short_video``), or both from one pool with replacement (``pool``,
:func:`mcl_starts`: the key may be the query's own clip or overlap it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


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
        free = halves[1][np.all(np.abs(halves[1][:, None] - np.array(keys, np.int64)[None]) >= span, axis=1)]
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
