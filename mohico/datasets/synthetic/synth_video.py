"""What both synthetic generators share: codecs, file names, frame compositing, YUV conversion, encoding.

:mod:`synth` (topic videos) and :mod:`synth_motion` (the motion benchmark) draw their frames
differently but name, composite, convert and encode them the same way, with these functions.
Frames are ``(H, W, 3)`` float32 RGB in [0, 255]; sprites are premultiplied RGBA with a 1 px
transparent border.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from mohico.errors import MohicoError

GOP = 16
CODECS = {  # codec -> (extension, container format, encoder, options)
    "vp9": (".webm", "webm", "libvpx-vp9",
            {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "lag-in-frames": "0",
             "row-mt": "0", "threads": "1", "g": str(GOP), "keyint_min": str(GOP)}),
    "h264": (".mp4", "mp4", "libx264",
             {"preset": "veryfast", "crf": "23", "threads": "1",
              "x264-params": f"keyint={GOP}:min-keyint={GOP}"}),
}


def video_name(index: int, codec: str = "vp9") -> str:
    """``video_{index:05d}.webm`` (VP9) or ``.mp4`` (H.264)."""
    return f"video_{index:05d}{CODECS[codec][0]}"


# BT.601 limited range, rows = output channel, last column = offset (inputs are RGB in 0..255)
_RGB_TO_Y = np.float32([[65.481 / 255, 128.553 / 255, 24.966 / 255, 16.0]])
_RGB_TO_UV = np.float32([[-37.797 / 255, -74.203 / 255, 112.0 / 255, 128.0],
                         [112.0 / 255, -93.786 / 255, -18.214 / 255, 128.0]])


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 (chroma from the 2x2 mean) of ``(H, W, 3)`` float32 RGB in [0, 255].

    Returns the ``(H * 3 // 2, W)`` uint8 layout of ``av.VideoFrame.from_ndarray(format="yuv420p")``.
    Done here rather than by swscale so the encoder sees fresh, fully initialised planes (x264 output
    was not reproducible from swscale-converted frames).
    """
    h, w, _ = rgb.shape
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = np.rint(cv2.transform(rgb, _RGB_TO_Y))
    uv = np.rint(cv2.transform(cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA), _RGB_TO_UV))
    out[h: h + h // 4] = uv[..., 0].reshape(h // 4, w)
    out[h + h // 4:] = uv[..., 1].reshape(h // 4, w)
    return out


def paste_sprite(img: np.ndarray, sprite: np.ndarray, x: float, y: float) -> None:
    """Alpha-composite a premultiplied RGBA sprite (1 px border) with its box's corner at (x, y)."""
    ix, iy = math.floor(x), math.floor(y)
    fx, fy = x - ix, y - iy
    sh, sw = sprite.shape[:2]
    if fx or fy:
        m = np.float32([[1, 0, fx], [0, 1, fy]])
        sprite = cv2.warpAffine(sprite, m, (sw, sh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    x0, y0 = ix - 1, iy - 1  # the sprite's 1 px transparent border
    H, W = img.shape[:2]
    a0, b0 = max(0, -x0), max(0, -y0)
    a1, b1 = min(sw, W - x0), min(sh, H - y0)
    if a1 <= a0 or b1 <= b0:
        return
    s = sprite[b0:b1, a0:a1]
    region = img[y0 + b0: y0 + b1, x0 + a0: x0 + a1]
    region *= 1.0 - s[..., 3:4]
    region += s[..., :3]


def clip_box(obj_id: int, x: float, y: float, w: float, h: float, width: int, height: int) -> list | None:
    """``[obj_id, x, y, w, h]`` of the box clipped to the ``width x height`` frame, or None if nothing is left."""
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return [obj_id, x0, y0, x1 - x0, y1 - y0]


def encode_video(path: Path, codec: str, fps, width: int, height: int, frames) -> None:
    """Stream ``frames`` (iterable of uint8 yuv420p arrays) into ``path`` atomically."""
    import av

    _, fmt, encoder, options = CODECS[codec]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with av.open(str(tmp), "w", format=fmt, container_options={"fflags": "+bitexact"}) as out:
            stream = out.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001), options=dict(options))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            cc = stream.codec_context
            cc.thread_count = 1
            cc.colorspace = cc.color_primaries = cc.color_trc = 6  # SMPTE 170M (BT.601)
            cc.color_range = 1  # MPEG (limited)
            for i, yuv in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, av.error.FFmpegError) as e:  # disk full, read-only folder, encoder failure
        tmp.unlink(missing_ok=True)
        raise MohicoError(f"cannot write {path}: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
