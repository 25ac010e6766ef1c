"""A picture of one shard sample (``mohico inspect``): a row of frames, a row of their motion maps
(upsampled, colour-mapped, same per-video scale), and the T-motion curve over the whole video.

``overlays`` is the hook for the sampler: a list of ``{"frames": [int, ...], "box": (x, y, w, h) |
None, "label": str, "color": (r, g, b)}`` (box in stored-frame pixels). With overlays the frames
shown are the first, middle and last frame of each overlay's clip, in time order, their boxes are
drawn on the frames and maps, and their spans are marked on the T-motion curve, whose axes are
labelled (time in seconds; T-motion, the mean motion magnitude per frame).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import textwrap
from pathlib import Path

import numpy as np

from mohico.datasets.sample_schema import JSON_MEMBER, MOTION_MEMBER, missing_meta_fields, split_name, video_member
from mohico.errors import MohicoError
from mohico.utils import atomic_write_bytes

TILE_H = 144
HEADER = 18
CURVE_H = 90
MIN_WIDTH = 960         # room for the caption and the clip lanes when few frames are shown
COLORS = [(255, 80, 80), (80, 200, 255), (120, 255, 120), (255, 220, 60)]


def read_sample(shard: str | os.PathLike, key: str | None = None) -> dict:
    """``{"key", "meta", "video": bytes, "ext", "motion": uint8 (N, gh, gw)}`` of ``key`` (default: the first sample)."""
    shard = Path(shard)
    files: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    seen: dict[str, None] = {}
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isreg():
                    continue
                k, ext = split_name(m.name.rsplit("/", 1)[-1])
                if key is not None and k != key:
                    seen[k] = None
                    continue
                if k not in files:
                    if key is None and order:
                        break           # first sample complete
                    files[k] = {}
                    order.append(k)
                files[k][ext] = tar.extractfile(m).read()
    except tarfile.ReadError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MohicoError(f"cannot read shard {shard}: not a tar file, or a damaged one ({first}); `mohico inspect` "
                          f"reads a shard tar written by `mohico shards` (shard-NNNNNN.tar), not a video") from None
    except (OSError, tarfile.TarError) as e:
        raise MohicoError(f"cannot read shard {shard}: {e}") from None
    if not order:
        if key is None or not seen:
            raise MohicoError(f"{shard} has no samples")
        keys = list(seen)
        listed = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise MohicoError(f"{shard} has no sample {key!r}; its keys: {listed}")
    k = order[0]
    parts = files[k]
    video_ext = video_member(parts)
    if video_ext is None or JSON_MEMBER not in parts or MOTION_MEMBER not in parts:
        raise MohicoError(f"sample {k} in {shard} lacks a video, json or motion.npy member (has {sorted(parts)})")
    damaged = "the shard is damaged or was not written by `mohico shards` (rewrite it with `mohico shards`)"
    try:
        meta = json.loads(parts[JSON_MEMBER])
    except ValueError as e:
        raise MohicoError(f"sample {k} in {shard}: member {k}.json is not valid JSON ({e}); {damaged}") from None
    missing = missing_meta_fields(meta)
    if missing:
        raise MohicoError(f"sample {k} in {shard}: member {k}.json lacks {', '.join(missing)}; {damaged}")
    try:
        motion = np.load(io.BytesIO(parts[MOTION_MEMBER]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise MohicoError(f"sample {k} in {shard}: member {k}.motion.npy is not a numpy array ({e}); {damaged}") from None
    if motion.ndim != 3 or motion.shape[0] < 1:
        raise MohicoError(f"sample {k} in {shard}: member {k}.motion.npy has shape {motion.shape}, expected "
                          f"(frames, grid h, grid w); {damaged}")
    return {"key": k, "meta": meta, "video": parts[video_ext], "ext": video_ext, "motion": motion}


def decode_frames(data: bytes, indices) -> dict[int, np.ndarray]:
    """RGB frames ``{index: (H, W, 3) uint8}`` for the wanted frame indices, decoding sequentially."""
    import av

    want = {int(i) for i in indices}
    out: dict[int, np.ndarray] = {}
    last = max(want) if want else -1
    with av.open(io.BytesIO(data)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in want:
                out[i] = f.to_ndarray(format="rgb24")
            if i >= last:
                break
    return out


def _tile(img: np.ndarray, w: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (w, TILE_H), interpolation=cv2.INTER_AREA)


def _text(img, text, org, scale=0.4, color=(235, 235, 235)):
    import cv2

    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def _label(img, text, org, color, scale=0.35):
    """Text on a dark backing so it reads on any frame."""
    import cv2

    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = max(int(org[0]), 0), max(int(org[1]), th + 2)
    x = min(x, max(img.shape[1] - tw - 2, 0))
    cv2.rectangle(img, (x - 1, y - th - 2), (x + tw + 1, y + base - 1), (0, 0, 0), -1)
    _text(img, text, (x, y - 1), scale, color)


def _axis_labels(canvas, y0: int, width: int, seconds: float, top: float) -> None:
    """Label the T-motion curve's axes: y = T-motion (0 .. its max), x = time in the video (s)."""
    _text(canvas, f"T-motion (max {top:.3g})", (width - 150, y0 + 12), color=(255, 200, 80))
    _text(canvas, "0s", (2, y0 + CURVE_H - 8), scale=0.35)
    end = f"{seconds:.1f}s"
    _text(canvas, end, (width - 8 * len(end), y0 + CURVE_H - 8), scale=0.35)
    _text(canvas, "time in the video ->", (width // 2 - 60, y0 + CURVE_H - 8), scale=0.35)


def _color(ov, k):
    return tuple(int(v) for v in ov.get("color", COLORS[k % len(COLORS)]))


def render_sample(shard: str | os.PathLike, key: str | None = None, out: str | os.PathLike | None = None,
                  num_frames: int = 8, overlays=None, notes=None, sample: dict | None = None) -> np.ndarray:
    """Render the picture as an RGB ``(H, W, 3)`` uint8 array; write it to ``out`` (PNG) if given.

    ``overlays``: see the module doc (an optional ``"short"`` string is written at the bottom of
    each frame of that overlay, else ``"label"``); ``notes``: extra caption lines (wrapped to the
    picture's width); ``sample``: an already read :func:`read_sample` dict (else ``shard``/``key``
    are read).
    """
    import cv2

    s = sample if sample is not None else read_sample(shard, key)
    meta, motion = s["meta"], s["motion"]
    n = motion.shape[0]
    overlays = list(overlays or [])
    notes = [str(t) for t in (notes or [])]
    if overlays:
        idx = []
        for ov in overlays:
            fr = sorted(int(f) for f in ov["frames"])
            idx += [fr[0], fr[len(fr) // 2], fr[-1]]
        idx = sorted(i for i in set(idx) if 0 <= i < n)          # time order, whichever view they come from
    else:
        idx = sorted(set(np.linspace(0, n - 1, min(num_frames, n)).round().astype(int).tolist()))
    member = f"{s['key']}.{s.get('ext', 'video')}"
    try:
        frames = decode_frames(s["video"], idx)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV/FFmpeg errors on bytes that are not a video
        raise MohicoError(f"sample {s['key']} in {shard}: member {member} is not a decodable video "
                          f"({type(e).__name__}: {str(e)[:200]}); the shard is damaged or was not written by "
                          f"`mohico shards` (rewrite it with `mohico shards`)") from None
    idx = [i for i in idx if i in frames]
    if not idx:
        raise MohicoError(f"sample {s['key']} in {shard}: no frames decoded from member {member} (rewrite the "
                          f"shard with `mohico shards`)")
    h0, w0 = frames[idx[0]].shape[:2]
    tw = round(w0 * TILE_H / h0)
    sx, sy = tw / w0, TILE_H / h0
    width = max(tw * len(idx), MIN_WIDTH)
    m = meta.get("motion", {})
    tm = np.asarray(meta.get("tmotion") or motion.reshape(n, -1).mean(1), dtype=np.float64)
    top = tm.max() if tm.size and tm.max() > 0 else 1.0
    caption = (f"{s['key']}  {meta.get('source', '')}  {meta['width']}x{meta['height']} {meta['fps']} fps "
               f"{meta['num_frames']} frames  label={meta.get('label')}  motion: {m.get('method')} "
               f"scale={m.get('scale', 0):.3g} grid={m.get('grid')}  T-motion max={top:.3g}")
    lines = [w for t in [caption, *notes] for w in textwrap.wrap(t, max(width // 7, 20))]
    canvas = np.full((HEADER + 2 * TILE_H + CURVE_H + HEADER * len(lines), width, 3), 24, np.uint8)
    members = [{int(f) for f in ov["frames"]} for ov in overlays]
    for c, i in enumerate(idx):
        x0 = c * tw
        frame = _tile(frames[i], tw)
        mmap = cv2.resize(motion[i], (tw, TILE_H), interpolation=cv2.INTER_NEAREST)
        mmap = cv2.cvtColor(cv2.applyColorMap(mmap, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        boxed = [(k, ov) for k, ov in enumerate(overlays) if i in members[k]]
        for k, ov in boxed:
            if ov.get("box") is None:
                continue
            x, y, w, h = ov["box"]
            col = _color(ov, k)
            p0, p1 = (int(x * sx), int(y * sy)), (int((x + w) * sx) - 1, int((y + h) * sy) - 1)
            cv2.rectangle(frame, p0, p1, col, 2)
            cv2.rectangle(mmap, p0, p1, col, 1)
        for j, (k, ov) in enumerate(boxed):      # labels after all boxes, stacked from the bottom
            text = ov.get("short") or ov.get("label")
            if text:
                _label(frame, str(text), (3, TILE_H - 4 - 13 * (len(boxed) - 1 - j)), _color(ov, k))
        canvas[HEADER:HEADER + TILE_H, x0:x0 + tw] = frame
        canvas[HEADER + TILE_H:HEADER + 2 * TILE_H, x0:x0 + tw] = mmap
        _text(canvas, f"f{i} {i / meta['fps']:.1f}s", (x0 + 3, HEADER - 5))
        for j, (k, _) in enumerate(boxed):       # which views this frame belongs to
            q = x0 + tw - 12 - 12 * j
            cv2.rectangle(canvas, (q, 4), (q + 8, HEADER - 6), _color(overlays[k], k), -1)
        cv2.line(canvas, (x0, HEADER), (x0, HEADER + 2 * TILE_H - 1), (24, 24, 24), 1)
    # T-motion curve over the whole video, each view's clip as a lane: span, frame ticks, label
    y0 = HEADER + 2 * TILE_H
    xs = (np.arange(n) + 0.5) / n * width
    for k, ov in enumerate(overlays):
        fr = [int(f) for f in ov["frames"]]
        col = _color(ov, k)
        a, b = int(min(fr) / n * width), int((max(fr) + 1) / n * width)
        cv2.rectangle(canvas, (a, y0 + 4), (max(b - 1, a + 1), y0 + CURVE_H - 4), col, 1)
        ly = y0 + 10 + 13 * k
        cv2.line(canvas, (a, ly), (max(b - 1, a + 1), ly), col, 3)
        for f in fr:
            cv2.line(canvas, (int(xs[min(f, n - 1)]), ly - 4), (int(xs[min(f, n - 1)]), ly + 4), col, 1)
        if ov.get("label"):
            label = str(ov["label"])
            (lw, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            lx = b + 4 if b + 4 + lw < width else max(a - 4 - lw, 0)
            _text(canvas, label, (lx, ly + 4), color=col)
    pts = np.stack([xs, y0 + CURVE_H - 6 - tm / top * (CURVE_H - 16)], 1).astype(np.int32)
    cv2.polylines(canvas, [pts], False, (255, 200, 80), 1, cv2.LINE_AA)
    _axis_labels(canvas, y0, width, n / float(meta["fps"]), top)
    for i in idx:
        cv2.line(canvas, (int(xs[i]), y0 + CURVE_H - 4), (int(xs[i]), y0 + CURVE_H), (200, 200, 200), 1)
    for j, line in enumerate(lines):
        _text(canvas, line, (3, y0 + CURVE_H + HEADER * (j + 1) - 5))
    if out is not None:
        ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if not ok:
            raise MohicoError(f"could not encode {out} as PNG")
        atomic_write_bytes(out, png.tobytes())
    return canvas
