"""Cut the packets one clip needs out of a video, without decoding (PyAV demux + mux).

A clip of frames ``[first, last]`` needs the packets from the keyframe at or before ``first`` up
to ``last``. :class:`ClipRemuxer` seeks to that keyframe (the container's cue/index, so the cost
does not grow with the video's length), copies the packets into a small in-memory container and
returns its bytes together with the keyframe's frame index; the decoder then takes the frame
indices relative to that keyframe. Frame ``i`` is the packet with presentation time
``start_time + i / fps`` (shards hold canonical constant-frame-rate videos with closed GOPs).

:func:`decode_frames` is the PyAV decoder used for codecs the local DALI backend cannot decode
(H.264 without a GPU) and as the reference for DALI's output.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from mohico.errors import MohicoError

#: codecs DALI's CPU video decoder reads (docs/DEPENDENCIES.md, DALI); everything decodes with device="mixed"
DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg"}


@dataclass
class RemuxedClip:
    data: bytes          # a small container (webm for VP8/VP9, matroska otherwise)
    key_frame: int       # frame index of its first (key) frame in the source video
    num_frames: int      # frames it holds


class ClipRemuxer:
    """Opens one video's bytes once; :meth:`cut` remuxes any number of clips from it."""

    def __init__(self, data: bytes, fps: float, name: str = "video"):
        import av

        self.name, self.fps = name, float(fps)
        try:
            self._in = av.open(io.BytesIO(data), mode="r")
            self._stream = self._in.streams.video[0]
        except (av.error.FFmpegError, IndexError, ValueError) as e:   # not a video we can read
            raise MohicoError(f"{name}: cannot open the video stream ({e})") from None
        s = self._stream
        self.codec = s.codec_context.name
        self._tb = s.time_base
        self._start = s.start_time or 0
        self._format = "webm" if self.codec in ("vp8", "vp9") else "matroska"

    def close(self) -> None:
        self._in.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _index(self, pts: int) -> int:
        return int(round(float((pts - self._start) * self._tb) * self.fps))

    def cut(self, first: int, last: int) -> RemuxedClip:
        """Packets from the keyframe at or before frame ``first`` through frame ``last``."""
        import av

        target = self._start + int(first / self.fps / self._tb)
        out_buf = io.BytesIO()
        try:
            self._in.seek(max(target, self._start), backward=True, any_frame=False, stream=self._stream)
            out = av.open(out_buf, mode="w", format=self._format)
            ostream = out.add_stream_from_template(self._stream)
            key, count, base_pts, base_dts = None, 0, 0, 0
            for pkt in self._in.demux(self._stream):
                if pkt.size == 0 or pkt.pts is None:
                    continue
                idx = self._index(pkt.pts)
                if key is None:
                    if not pkt.is_keyframe or idx > first:
                        if idx > first:
                            raise MohicoError(f"{self.name}: no keyframe at or before frame {first}")
                        continue
                    key, base_pts = idx, pkt.pts
                    base_dts = pkt.dts if pkt.dts is not None else pkt.pts
                if idx > last:
                    break
                pkt.pts -= base_pts
                if pkt.dts is not None:
                    pkt.dts -= base_dts
                pkt.stream = ostream
                out.mux(pkt)
                count += 1
            out.close()
        except av.error.FFmpegError as e:
            raise MohicoError(f"{self.name}: cannot remux frames {first}..{last} ({e})") from None
        if key is None or count == 0 or key + count - 1 < last:
            raise MohicoError(f"{self.name}: frames {first}..{last} are not in the video "
                              f"(found {count} packets from keyframe {key})")
        return RemuxedClip(out_buf.getvalue(), key, count)


def decode_frames(data: bytes, frames: np.ndarray, name: str = "clip") -> np.ndarray:
    """Decode the frames at indices ``frames`` (display order, 0 = first frame of ``data``).

    Returns ``(len(frames), H, W, 3)`` uint8 RGB. Decodes sequentially up to ``max(frames)``.
    """
    import av

    frames = np.asarray(frames, dtype=np.int64)
    want = set(int(f) for f in frames)
    last = int(frames.max())
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for i, fr in enumerate(c.decode(s)):
                if i in want:
                    got[i] = fr.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except av.error.FFmpegError as e:
        raise MohicoError(f"{name}: cannot decode ({e})") from None
    missing = want - set(got)
    if missing:
        raise MohicoError(f"{name}: frames {sorted(missing)[:5]} are missing from the decoded stream")
    return np.stack([got[int(f)] for f in frames])
