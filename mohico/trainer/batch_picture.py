"""The W&B picture of a training batch: each view's frames in time order, each drawn where it lies in
the stored frame with its crop box, the motion maps the same way, and a T-motion plot with
labelled axes.

Per sample (``max_samples`` of them), per view two rows of up to ``max_frames`` tiles in
frame-index order: the stored frame's extent (grey), the view's crop pasted into its box (mirrored
back when the view was flipped), the box outlined in the view's colour and the tile captioned
with the view and the frame index; below, the view's motion map placed the same way. Then one
plot: x = frame index in the video, y = the clip's mean motion magnitude per frame, one line per
view, axes labelled.
"""
from __future__ import annotations

import numpy as np

from mohico.datasets.load.batch import ClipBatch

COLOURS = np.array([[0, 255, 0], [255, 64, 64], [64, 128, 255], [255, 255, 0]], dtype=np.uint8)
BACKGROUND = 64
TEXT = (235, 235, 235)


def _text(img: np.ndarray, text: str, org, scale: float = 0.35, colour=TEXT) -> None:
    import cv2

    cv2.putText(img, text, (int(org[0]), int(org[1])), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _resize(img: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    import cv2

    return cv2.resize(img, (max(w, 1), max(h, 1)), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _heat(m: np.ndarray, top: float) -> np.ndarray:
    """``(h, w)`` magnitudes -> ``(h, w, 3)`` uint8 "hot" colours (0 black, ``top`` white)."""
    u = np.clip(m / (top + 1e-8), 0, 1)
    return (np.stack([u, u ** 2, u ** 4], axis=-1) * 255).astype(np.uint8)


def _placed(content: np.ndarray, box, extent, tile: int, colour) -> np.ndarray:
    """A tile of height ``tile`` showing the stored frame ``extent`` (w, h) with ``content`` in ``box``."""
    k = tile / extent[1]
    canvas = np.full((tile, max(int(round(extent[0] * k)), 1), 3), BACKGROUND, np.uint8)
    x, y, w, h = (np.asarray(box, dtype=np.float64) * k).round().astype(int)
    x, y = max(x, 0), max(y, 0)
    w, h = min(w, canvas.shape[1] - x), min(h, canvas.shape[0] - y)
    if w > 1 and h > 1:
        canvas[y:y + h, x:x + w] = _resize(content, h, w, nearest=content.shape[0] < 32)
        import cv2

        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), tuple(int(c) for c in colour), 2)
    return canvas


def tmotion_plot(frames: np.ndarray, tmotion: np.ndarray, width: int, height: int) -> np.ndarray:
    """``frames, tmotion: (V, T)`` -> a ``(height, width, 3)`` plot: one line per view, x = frame
    index in the video, y = mean motion magnitude; labelled axes with their ranges."""
    import cv2

    img = np.full((height, width, 3), 24, np.uint8)
    left, right, top, bottom = 44, 8, 8, 26
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    lo, hi = float(frames.min()), float(frames.max())
    ymax = float(tmotion.max()) if tmotion.size and tmotion.max() > 0 else 1.0
    cv2.line(img, (x0, y1), (x1, y1), TEXT, 1)
    cv2.line(img, (x0, y0), (x0, y1), TEXT, 1)
    for v in range(frames.shape[0]):
        xs = x0 + (frames[v] - lo) / max(hi - lo, 1.0) * (x1 - x0)
        ys = y1 - tmotion[v] / ymax * (y1 - y0)
        order = np.argsort(frames[v], kind="stable")
        pts = np.stack([xs[order], ys[order]], 1).round().astype(np.int32)
        colour = tuple(int(c) for c in COLOURS[v % len(COLOURS)])
        cv2.polylines(img, [pts], False, colour, 1, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, (int(p[0]), int(p[1])), 2, colour, -1)
    _text(img, f"{lo:.0f}", (x0 - 2, y1 + 12))
    _text(img, f"{hi:.0f}", (x1 - 24, y1 + 12))
    _text(img, "frame index in the video", ((x0 + x1) // 2 - 70, height - 3))
    _text(img, f"{ymax:.3g}", (2, y0 + 8))
    _text(img, "0", (30, y1))
    _text(img, "T-motion", (2, (y0 + y1) // 2 - 2))
    _text(img, "(mean)", (2, (y0 + y1) // 2 + 10))
    return img


def batch_picture(batch: ClipBatch, mean, std, max_samples: int = 2, tile: int = 96, max_frames: int = 8) -> np.ndarray:
    """uint8 ``(H, W, 3)`` picture of ``batch`` (module docstring). Uses its ``clips (B, V, C, T, H, W)``,
    ``boxes (B, V, 4)`` (x, y, w, h in stored-frame pixels), ``frames (B, V, T)``, ``flip (B, V)``
    and ``motion (B, V, T, M, M)``."""
    def arr(x):
        return x.detach().float().cpu().numpy()

    clips = arr(batch.clips)
    B, V, C, T, H, W = clips.shape
    motion, boxes, frames, flip = arr(batch.motion), arr(batch.boxes), arr(batch.frames), arr(batch.flip)
    m = np.asarray(mean, dtype=np.float32).reshape(C, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(C, 1, 1)
    rows = []
    for b in range(min(B, max_samples)):
        idx, bx = frames[b], boxes[b]
        extent = (max(float((bx[:, 0] + bx[:, 2]).max()), 1.0), max(float((bx[:, 1] + bx[:, 3]).max()), 1.0))
        top = float(motion[b].max())
        for v in range(V):
            colour = COLOURS[v % len(COLOURS)]
            order = np.argsort(idx[v], kind="stable")                      # time order
            shown = order[np.linspace(0, T - 1, min(T, max_frames)).round().astype(int)] if T > max_frames else order
            pics, heats = [], []
            for t in shown:
                f = np.clip((clips[b, v, :, t] * s + m).transpose(1, 2, 0), 0, 1)
                f = (f * 255).astype(np.uint8)
                mm = motion[b, v, min(t, motion.shape[2] - 1)]
                if flip[b, v]:                        # back to stored-frame orientation
                    f, mm = f[:, ::-1], mm[:, ::-1]
                pic = _placed(np.ascontiguousarray(f), bx[v], extent, tile, colour)
                _text(pic, f"v{v} f{int(idx[v][t])}", (3, 11))
                pics.append(pic)
                heats.append(_placed(_heat(np.ascontiguousarray(mm), top), bx[v], extent, tile, colour))
            rows += [np.concatenate(pics, axis=1), np.concatenate(heats, axis=1)]
        tm = motion[b].reshape(V, motion.shape[2], -1).mean(-1)[:, :T]
        rows.append(tmotion_plot(idx[:, :tm.shape[1]], tm, max(r.shape[1] for r in rows), tile))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=24) for r in rows]
    return np.concatenate(rows, axis=0)
