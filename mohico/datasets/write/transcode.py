"""Canonical re-encode of one video with PyAV, streamed frame by frame.

decode (any container/codec FFmpeg reads) -> re-time to constant frame rate by PTS -> resize to
short side N (even sizes, swscale AREA) -> encode (VP9 in WebM or H.264 in MP4, a keyframe at least
every ``gop`` frames, no B-frames) while handing each output frame's luma plane to a callback
(the motion mapper). Only the current and the previous decoded frame are alive at any time; the
encoded bytes (a few MB for a 10-minute video at 112p) are the only thing that grows.

Bad input raises :class:`SkipVideo` with a reason the writer records in the manifest.
Output bytes are deterministic (bit-exact muxing, single-threaded encoders, fixed options).
"""
from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from dataclasses import dataclass
from typing import Callable

import numpy as np

CODECS = {
    # name: (container format, file extension, encoder, encoder options)
    "vp9": ("webm", "webm", "libvpx-vp9", {
        "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "auto-alt-ref": "0",
        "crf": "30", "b": "0", "row-mt": "0", "tile-columns": "0", "threads": "1"}),
    "h264": ("mp4", "mp4", "libx264", {
        "preset": "veryfast", "crf": "23", "threads": "1", "x264-params": "bframes=0:sliced-threads=0"}),
}


MAX_GAP = 10.0   # seconds between two source frames beyond which the timestamps are taken as broken


class SkipVideo(Exception):
    """This input cannot become a sample; ``str(e)`` is the reason recorded in the manifest."""


@dataclass
class Transcoded:
    data: bytes                 # the encoded container
    ext: str                    # "webm" | "mp4"
    num_frames: int
    width: int
    height: int
    fps: int
    source_fps: float           # mean source frame rate from PTS
    source_vfr: bool            # source frame intervals varied by > 25% of the mean
    source_width: int
    source_height: int
    source_codec: str
    source_duration: float      # seconds, from PTS (last frame end - first frame start)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Keep the aspect ratio, short side = ``short_side``, both sizes even."""
    if width <= height:
        w = short_side
        h = int(round(height * short_side / width / 2)) * 2
    else:
        h = short_side
        w = int(round(width * short_side / height / 2)) * 2
    return max(w, 2), max(h, 2)


def _open_encoder(codec: str, width: int, height: int, fps: int, gop: int):
    import av

    fmt, ext, encoder, options = CODECS[codec]
    buf = io.BytesIO()
    out = av.open(buf, "w", format=fmt, options={"fflags": "+bitexact"})
    stream = out.add_stream(encoder, rate=fps, options=dict(options))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.gop_size = gop
    stream.codec_context.thread_count = 1
    return buf, out, stream, ext


def transcode(path: str | os.PathLike, codec: str = "vp9", short_side: int = 112, fps: int = 15,
              gop: int = 16, on_frame: Callable[[np.ndarray], None] | None = None) -> Transcoded:
    """Re-encode ``path`` to the canonical form; ``on_frame(luma (H, W) uint8)`` sees every output frame."""
    import av

    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SkipVideo(f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise SkipVideo("zero-byte file")
    try:
        src = av.open(path, "r")
    except av.FFmpegError as e:
        raise SkipVideo(f"not a readable media file ({e.__class__.__name__}: {getattr(e, 'strerror', None) or e})") from None
    with src:
        if not src.streams.video:
            raise SkipVideo("no video stream")
        vs = src.streams.video[0]
        cname = vs.codec_context.name if vs.codec_context is not None else "unknown"
        if vs.codec_context is None or cname in ("none", "unknown"):
            raise SkipVideo("unreadable codec: FFmpeg has no decoder for this video stream")
        vs.codec_context.thread_count = 1
        rate = float(vs.average_rate or vs.guessed_rate or 0) or 25.0
        declared = None
        if vs.duration is not None and vs.time_base is not None:
            declared = float(vs.duration * vs.time_base)
        elif src.duration and len(src.streams) == 1:
            declared = src.duration / 1e6

        enc = None
        out_tb = Fraction(1, fps)
        k = 0                    # next output frame index
        cur = None               # (time, resized frame, luma)
        t0 = t_prev = None
        n_src = 0
        dt_min, dt_max = math.inf, 0.0
        src_w = src_h = 0

        def emit_until(boundary: float):
            nonlocal k
            frame, luma = cur[1], cur[2]
            while k / fps < boundary - 1e-9:
                if on_frame is not None:
                    on_frame(luma)
                frame.pts = k
                frame.time_base = out_tb
                try:
                    for p in enc[2].encode(frame):
                        enc[1].mux(p)
                except av.FFmpegError as e:   # not the input's fault: surface it, do not call it corrupt
                    raise RuntimeError(f"{codec} encoder failed at output frame {k}: {e}") from e
                k += 1

        try:
            for frame in src.decode(vs):
                t = frame.time
                if t is None:
                    t = (t_prev + 1.0 / rate) if t_prev is not None else 0.0
                if t0 is None:
                    t0 = t
                    src_w, src_h = frame.width, frame.height
                    W, H = output_size(frame.width, frame.height, short_side)
                    buf, out, stream, ext = _open_encoder(codec, W, H, fps, gop)
                    enc = (buf, out, stream, ext)
                t -= t0
                if t_prev is not None:
                    if t <= t_prev:      # broken/non-monotonic timestamp: keep the newer picture
                        t = t_prev
                    else:
                        dt = t - t_prev
                        if dt > MAX_GAP:   # would be re-timed into minutes of one repeated picture
                            raise SkipVideo(f"broken timestamps: a {dt:.1f} s gap after frame {n_src} "
                                            f"(more than {MAX_GAP:.0f} s)")
                        dt_min, dt_max = min(dt_min, dt), max(dt_max, dt)
                small = frame.reformat(width=W, height=H, format="yuv420p", interpolation="AREA")
                plane = small.planes[0]
                luma = np.frombuffer(plane, np.uint8).reshape(H, plane.line_size)[:, :W].copy()
                if cur is not None and t > cur[0]:
                    emit_until((cur[0] + t) / 2)   # nearest source frame for each output time
                cur = (t, small, luma)
                t_prev = t
                n_src += 1
        except av.FFmpegError as e:
            raise SkipVideo(f"corrupt or truncated: decoding failed after {n_src} frames "
                            f"({e.__class__.__name__}: {getattr(e, 'strerror', None) or e})") from None
        if cur is None:
            raise SkipVideo("no decodable video frames")
        mean_dt = (t_prev / (n_src - 1)) if n_src > 1 else 1.0 / rate
        end = t_prev + (mean_dt if n_src > 1 else 1.0 / rate)
        if declared and declared > 1.0 and end < 0.9 * declared - 0.5:
            raise SkipVideo(f"truncated: decoded {end:.2f} s of the {declared:.2f} s the container declares")
        emit_until(max(end, 1e-6))
        buf, out, stream, ext = enc
        for p in stream.encode():
            out.mux(p)
        out.close()
        vfr = n_src > 2 and (dt_max - dt_min) > 0.25 * mean_dt
        return Transcoded(data=buf.getvalue(), ext=ext, num_frames=k, width=W, height=H, fps=fps,
                          source_fps=1.0 / mean_dt if mean_dt > 0 else rate, source_vfr=bool(vfr),
                          source_width=src_w, source_height=src_h, source_codec=cname,
                          source_duration=end)
