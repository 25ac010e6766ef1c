"""A picture of one shard sample (``mohico inspect``): a row of frames, a row of their motion maps
(upsampled, colour-mapped, same per-video scale), and the T-motion curve over the whole video.

``overlays`` is the hook for the sampler: a list of ``{"frames": [int, ...], "box": (x, y, w, h) |
None, "label": str, "color": (r, g, b)}`` (box in stored-frame pixels). With overlays the frames
shown are the first, middle and last frame of each overlay's clip, their boxes are drawn on the
frames and maps, and their spans are marked on the T-motion curve.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from mohico.errors import MohicoError

TILE_H = 144
HEADER = 18
CURVE_H = 90
COLORS = [(255, 80, 80), (80, 200, 255), (120, 255, 120), (255, 220, 60)]


def read_sample(shard: str | os.PathLike, key: str | None = None) -> dict:
    """``{"key", "meta", "video": bytes, "ext", "motion": uint8 (N, gh, gw)}`` of ``key`` (default: the first sample)."""
    shard = Path(shard)
    files: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isreg():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if key is not None and k != key:
                    continue
                if k not in files:
                    if key is None and order:
                        break           # first sample complete
                    files[k] = {}
                    order.append(k)
                files[k][ext] = tar.extractfile(m).read()
    except (OSError, tarfile.TarError) as e:
        raise MohicoError(f"cannot read shard {shard}: {e}") from None
    if not order:
        raise MohicoError(f"{shard} has no sample {key!r}" if key else f"{shard} has no samples")
    k = order[0]
    parts = files[k]
    video_ext = next((e for e in ("webm", "mp4", "mkv") if e in parts), None)
    if video_ext is None or "json" not in parts or "motion.npy" not in parts:
        raise MohicoError(f"sample {k} in {shard} lacks a video, json or motion.npy member (has {sorted(parts)})")
    return {"key": k, "meta": json.loads(parts["json"]), "video": parts[video_ext], "ext": video_ext,
            "motion": np.load(io.BytesIO(parts["motion.npy"]), allow_pickle=False)}


def decode_frames(data: bytes, indices) -> dict[int, np.ndarray]:
    """RGB frames ``{index: (H, W, 3) uint8}`` for the wanted frame indices, decoding sequentially."""
    import av

    want = set(int(i) for i in indices)
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


def render_sample(shard: str | os.PathLike, key: str | None = None, out: str | os.PathLike | None = None,
                  num_frames: int = 8, overlays=None) -> np.ndarray:
    """Render the picture as an RGB ``(H, W, 3)`` uint8 array; write it to ``out`` (PNG) if given."""
    import cv2

    s = read_sample(shard, key)
    meta, motion = s["meta"], s["motion"]
    n = motion.shape[0]
    overlays = list(overlays or [])
    if overlays:
        idx = []
        for ov in overlays:
            fr = sorted(int(f) for f in ov["frames"])
            idx += [fr[0], fr[len(fr) // 2], fr[-1]]
        idx = [i for i in dict.fromkeys(idx) if 0 <= i < n]
    else:
        idx = sorted(set(np.linspace(0, n - 1, min(num_frames, n)).round().astype(int).tolist()))
    frames = decode_frames(s["video"], idx)
    idx = [i for i in idx if i in frames]
    if not idx:
        raise MohicoError(f"sample {s['key']} in {shard}: no frames decoded")
    h0, w0 = frames[idx[0]].shape[:2]
    tw = int(round(w0 * TILE_H / h0))
    sx, sy = tw / w0, TILE_H / h0
    width = tw * len(idx)
    canvas = np.full((HEADER + 2 * TILE_H + CURVE_H + HEADER, width, 3), 24, np.uint8)
    for c, i in enumerate(idx):
        x0 = c * tw
        frame = _tile(frames[i], tw)
        mmap = cv2.resize(motion[i], (tw, TILE_H), interpolation=cv2.INTER_NEAREST)
        mmap = cv2.cvtColor(cv2.applyColorMap(mmap, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        for k, ov in enumerate(overlays):
            if ov.get("box") is None or i not in set(int(f) for f in ov["frames"]):
                continue
            x, y, w, h = ov["box"]
            col = tuple(int(v) for v in ov.get("color", COLORS[k % len(COLORS)]))
            p0, p1 = (int(x * sx), int(y * sy)), (int((x + w) * sx) - 1, int((y + h) * sy) - 1)
            cv2.rectangle(frame, p0, p1, col, 2)
            cv2.rectangle(mmap, p0, p1, col, 1)
        canvas[HEADER:HEADER + TILE_H, x0:x0 + tw] = frame
        canvas[HEADER + TILE_H:HEADER + 2 * TILE_H, x0:x0 + tw] = mmap
        _text(canvas, f"f{i} {i / meta['fps']:.1f}s", (x0 + 3, HEADER - 5))
    # T-motion curve over the whole video
    y0 = HEADER + 2 * TILE_H
    tm = np.asarray(meta.get("tmotion") or motion.reshape(n, -1).mean(1), dtype=np.float64)
    top = tm.max() if tm.size and tm.max() > 0 else 1.0
    xs = (np.arange(n) + 0.5) / n * width
    for k, ov in enumerate(overlays):
        fr = [int(f) for f in ov["frames"]]
        col = tuple(int(v) for v in ov.get("color", COLORS[k % len(COLORS)]))
        a, b = int(min(fr) / n * width), int((max(fr) + 1) / n * width)
        cv2.rectangle(canvas, (a, y0 + 4), (max(b - 1, a + 1), y0 + CURVE_H - 4), col, 1)
        if ov.get("label"):
            _text(canvas, str(ov["label"]), (a + 2, y0 + 14), color=col)
    pts = np.stack([xs, y0 + CURVE_H - 6 - tm / top * (CURVE_H - 16)], 1).astype(np.int32)
    cv2.polylines(canvas, [pts], False, (255, 200, 80), 1, cv2.LINE_AA)
    for i in idx:
        cv2.line(canvas, (int(xs[i]), y0 + CURVE_H - 4), (int(xs[i]), y0 + CURVE_H), (200, 200, 200), 1)
    m = meta.get("motion", {})
    _text(canvas, f"{s['key']}  {meta.get('source', '')}  {meta['width']}x{meta['height']} {meta['fps']} fps "
                  f"{meta['num_frames']} frames  label={meta.get('label')}  motion: {m.get('method')} "
                  f"scale={m.get('scale', 0):.3g} grid={m.get('grid')}  T-motion max={top:.3g}",
          (3, canvas.shape[0] - 5))
    if out is not None:
        from mohico.utils import atomic_write_bytes

        ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if not ok:
            raise MohicoError(f"could not encode {out} as PNG")
        atomic_write_bytes(out, png.tobytes())
        os.chmod(out, 0o644)
    return canvas
