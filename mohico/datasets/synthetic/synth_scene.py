"""Scene model of the synthetic untrimmed videos: topics, shot plans, textures and sprites.

Pure numpy/OpenCV, no I/O. ``synth.py`` turns a :class:`ShotPlan` list into frames and files.

Conventions (shared with the ground truth JSON):
- Pixel coordinates of the visible frame: x to the right, y down, (0, 0) = top-left pixel corner.
- ``pan = (vx, vy)``: displacement of the *background content in the image*, px/frame (what optical
  flow measures on the background): ``frame[f+1](x + vx, y + vy) == frame[f](x, y)``.
- Velocities, pans and start positions are multiples of 1/16 px (``QUANT``) so positions and camera
  translations are exact in float64 and in the JSON.
- Objects move in screen space and bounce off the frame borders (a triangle wave per axis).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

QUANT = 16  # velocities / pans / start positions are multiples of 1 / QUANT px
SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "star", "ring", "cross")
PATTERNS = ("checker", "stripes", "spots", "rings")
# Speed range per motion level (0 static, 1 slow, 2 medium, 3 fast) in px/frame at 15 fps and a
# 120 px short side; it scales with the short side and with 15 / fps (same px/s at any frame rate).
LEVEL_SPEED = {0: (0.0, 0.125), 1: (0.25, 1.0), 2: (1.0, 2.5), 3: (2.5, 5.0)}
LEVEL_PROB = (0.2, 0.25, 0.3, 0.25)


def _quant(v: float) -> float:
    return round(v * QUANT) / QUANT


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


@dataclass
class Topic:
    """A family of backgrounds and object kinds shared by the shots of videos of one topic."""

    index: int
    palette: np.ndarray            # (5, 3) float RGB 0..255, dark to light
    cell: tuple[float, float]      # coarsest value-noise cell size range (px at 120 px short side)
    persistence: float             # amplitude ratio between octaves
    stripe_weight: float           # weight of the oriented sinusoid component
    stripe_angle: float            # radians
    stripe_wavelength: tuple[float, float]
    shapes: tuple[str, ...]        # object kinds of this topic
    patterns: tuple[str, ...]
    object_palette: np.ndarray     # (3, 3) float RGB


def make_topic(index: int, topics: int, seed: int) -> Topic:
    """Topic ``index`` of ``topics`` for ``seed``: hues spread around the colour circle."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, index]))
    offset = np.random.default_rng(np.random.SeedSequence([seed, 2])).random()
    hue = (offset + index / max(topics, 1)) % 1.0
    sat = rng.uniform(0.3, 0.75)
    vals = np.sort(rng.uniform(0.15, 0.95, 5))
    vals = vals[0] + (vals - vals[0]) * (0.8 / max(vals[-1] - vals[0], 1e-6))  # full dark..light span
    palette = np.stack([_hsv(hue + rng.uniform(-0.05, 0.05), sat * rng.uniform(0.7, 1.3), v) for v in vals])
    ohue = hue + 0.5 + rng.uniform(-0.12, 0.12)
    object_palette = np.stack([_hsv(ohue + rng.uniform(-0.08, 0.08), rng.uniform(0.55, 0.95), v)
                               for v in (rng.uniform(0.15, 0.35), rng.uniform(0.5, 0.7), rng.uniform(0.85, 1.0))])
    c0 = rng.uniform(14, 40)
    return Topic(
        index=index, palette=palette, cell=(c0, c0 * 1.6), persistence=rng.uniform(0.45, 0.7),
        stripe_weight=rng.uniform(0.0, 0.6), stripe_angle=rng.uniform(0, math.pi),
        stripe_wavelength=(rng.uniform(6, 12), rng.uniform(14, 30)),
        shapes=tuple(rng.choice(SHAPES, size=2, replace=False)),
        patterns=tuple(rng.choice(PATTERNS, size=2, replace=False)),
        object_palette=object_palette,
    )


@dataclass
class ObjectPlan:
    id: int
    kind: str
    pattern: str
    size: tuple[int, int]          # (w, h) px
    position: tuple[float, float]  # (x, y) of the box's top-left corner at the shot's first frame
    velocity: tuple[float, float]  # px/frame at the shot's first frame (sign flips on bounces)
    seed: int                      # texture seed

    def positions(self, n: int, width: int, height: int) -> np.ndarray:
        """Top-left corners for the shot's ``n`` frames, bouncing inside the frame: ``(n, 2)`` float64."""
        k = np.arange(n, dtype=np.float64)[:, None]
        span = np.array([width - self.size[0], height - self.size[1]], dtype=np.float64)
        p = np.asarray(self.position) + np.asarray(self.velocity) * k
        m = np.mod(p, 2 * span)
        return np.where(m <= span, m, 2 * span - m)


@dataclass
class ShotPlan:
    start: int
    end: int                       # exclusive
    motion_level: int
    pan: tuple[float, float]
    noise_sigma: float
    seed: int                      # background texture seed
    gain: float                    # per-shot brightness
    hue_shift: float
    objects: list[ObjectPlan] = field(default_factory=list)

    @property
    def static(self) -> bool:
        return self.motion_level == 0

    @property
    def speed(self) -> float:
        """Fastest motion in the shot (pan or object), px/frame."""
        speeds = [math.hypot(*self.pan)] + [math.hypot(*o.velocity) for o in self.objects]
        return max(speeds)


def shot_bounds(num_frames: int, min_len: int, max_len: int, rng) -> list[tuple[int, int]]:
    """Split ``num_frames`` into consecutive shots ``[(start, end), ...]`` of ``min_len..max_len``
    frames drawn from ``rng`` (a short tail joins the last shot)."""
    bounds, start = [], 0
    while start < num_frames:
        length = int(rng.integers(min_len, max_len + 1))
        if num_frames - (start + length) < min_len:
            length = num_frames - start
        bounds.append((start, start + length))
        start += length
    return bounds


def plan_shots(rng: np.random.Generator, num_frames: int, fps: float, width: int, height: int,
               topic: Topic) -> list[ShotPlan]:
    """Split ``num_frames`` into shots of 1-4 s and draw each shot's motion, pan and objects."""
    min_len = max(4, int(round(1.0 * fps)))
    max_len = max(min_len, int(round(4.0 * fps)))
    bounds = shot_bounds(num_frames, min_len, max_len, rng)
    scale = min(width, height) / 120.0
    per_frame = scale * 15.0 / fps
    shots, next_id = [], 0
    for start, end in bounds:
        level = int(rng.choice(4, p=LEVEL_PROB))
        lo, hi = (s * per_frame for s in LEVEL_SPEED[level])

        def velocity() -> tuple[float, float]:
            speed, angle = rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi)
            # truncate toward zero so the quantised speed never exceeds the level's range
            return math.trunc(speed * math.cos(angle) * QUANT) / QUANT, math.trunc(speed * math.sin(angle) * QUANT) / QUANT

        pan = velocity() if level > 0 and rng.random() < 0.6 else (0.0, 0.0)
        if end - start > 1:  # bound the background canvas: the pan covers at most 2 frame sizes
            cap = (2.0 * width / (end - start - 1), 2.0 * height / (end - start - 1))
            pan = tuple(math.copysign(min(abs(v), math.floor(c * QUANT) / QUANT), v) for v, c in zip(pan, cap))
        n_obj = int(rng.choice(3, p=(0.4, 0.4, 0.2))) if level == 0 else int(rng.integers(0, 4))
        if level > 0 and pan == (0.0, 0.0) and n_obj == 0:
            n_obj = 1  # a moving shot must move
        objects = []
        for _ in range(n_obj):
            side = min(width, height)
            w = int(rng.uniform(0.15, 0.35) * side)
            h = int(np.clip(w * rng.uniform(0.7, 1.4), 0.12 * side, 0.4 * side))
            pos = (_quant(rng.uniform(0, width - w)), _quant(rng.uniform(0, height - h)))
            vel = velocity()
            if level > 0 and math.hypot(*vel) == 0.0:
                vel = (_quant(lo) or 1.0 / QUANT, 0.0)
            objects.append(ObjectPlan(id=next_id, kind=str(rng.choice(topic.shapes)),
                                      pattern=str(rng.choice(topic.patterns)), size=(w, h), position=pos,
                                      velocity=vel, seed=int(rng.integers(2**31))))
            next_id += 1
        shots.append(ShotPlan(start=start, end=end, motion_level=level, pan=pan,
                              noise_sigma=float(rng.uniform(1.5, 4.0)), seed=int(rng.integers(2**31)),
                              gain=float(rng.uniform(0.8, 1.2)), hue_shift=float(rng.uniform(-0.04, 0.04)),
                              objects=objects))
    return shots


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float, octaves: int,
                persistence: float) -> np.ndarray:
    """Multi-octave value noise in [0, 1]: ``(height, width)`` float32."""
    out = np.zeros((height, width), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        c = max(cell, 1.5)
        gh, gw = int(math.ceil(height / c)) + 2, int(math.ceil(width / c)) + 2
        grid = rng.random((gh, gw), dtype=np.float32)
        up = cv2.resize(grid, (int(round(gw * c)), int(round(gh * c))), interpolation=cv2.INTER_CUBIC)
        out += amp * up[:height, :width]
        total += amp
        amp *= persistence
        cell /= 2.0
    out /= total
    lo, hi = np.percentile(out, (1, 99))
    return np.clip((out - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _colormap(field01: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a [0, 1] field through a piecewise-linear palette: ``(H, W)`` -> ``(H, W, 3)`` float32."""
    stops = np.linspace(0.0, 1.0, len(palette))
    return np.stack([np.interp(field01, stops, palette[:, c]).astype(np.float32) for c in range(3)], axis=-1)


def background_canvas(shot: ShotPlan, topic: Topic, height: int, width: int, scale: float) -> np.ndarray:
    """A textured background of ``(height, width, 3)`` float32 RGB for one shot."""
    rng = np.random.default_rng(shot.seed)
    cell = rng.uniform(*topic.cell) * scale
    base = value_noise(rng, height, width, cell, octaves=5, persistence=topic.persistence)
    warp = value_noise(rng, height, width, cell * 2, octaves=2, persistence=0.5)
    if topic.stripe_weight > 0:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = topic.stripe_angle + rng.uniform(-0.3, 0.3)
        lam = rng.uniform(*topic.stripe_wavelength) * scale
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / lam) + 6.0 * warp
        stripes = 0.5 + 0.5 * np.sin(phase)
        base = (1 - topic.stripe_weight) * base + topic.stripe_weight * stripes
    palette = topic.palette * shot.gain
    if rng.random() < 0.5:
        palette = palette[::-1]  # swap light/dark so consecutive shots differ at low frequency too
    rgb = _colormap(base, palette)
    shade = 0.75 + 0.5 * value_noise(rng, height, width, cell * 3, octaves=1, persistence=0.5)
    return np.clip(rgb * shade[..., None], 0, 255).astype(np.float32)


def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased alpha mask in [0, 1] filling a ``(h, w)`` box (4x supersampled)."""
    s = 4
    W, H = w * s, h * s
    m = np.zeros((H, W), np.uint8)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    if kind == "ellipse":
        cv2.ellipse(m, (int(cx), int(cy)), (W // 2, H // 2), 0, 0, 360, 255, -1)
    elif kind == "rectangle":
        m[:] = 255
    elif kind == "triangle":
        cv2.fillPoly(m, [np.array([[W // 2, 0], [W - 1, H - 1], [0, H - 1]], np.int32)], 255)
    elif kind == "diamond":
        cv2.fillPoly(m, [np.array([[W // 2, 0], [W - 1, H // 2], [W // 2, H - 1], [0, H // 2]], np.int32)], 255)
    elif kind == "star":
        n = int(rng.integers(5, 8))
        ang = np.arange(2 * n) * math.pi / n - math.pi / 2
        rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, 0.5)
        pts = np.stack([cx + rad * np.cos(ang) * W / 2, cy + rad * np.sin(ang) * H / 2], -1)
        pts -= pts.min(0)
        pts *= np.array([W - 1, H - 1]) / np.maximum(pts.max(0), 1)
        cv2.fillPoly(m, [pts.round().astype(np.int32)], 255)
    elif kind == "ring":
        cv2.ellipse(m, (int(cx), int(cy)), (W // 2, H // 2), 0, 0, 360, 255, -1)
        cv2.ellipse(m, (int(cx), int(cy)), (W // 5, H // 5), 0, 0, 360, 0, -1)
    elif kind == "cross":
        m[H // 3: H - H // 3, :] = 255
        m[:, W // 3: W - W // 3] = 255
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _pattern(kind: str, w: int, h: int, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "checker":
        c = rng.uniform(3, 7)
        field01 = ((np.floor(xx / c) + np.floor(yy / c)) % 2).astype(np.float32)
    elif kind == "stripes":
        a, lam = rng.uniform(0, math.pi), rng.uniform(4, 8)
        field01 = 0.5 + 0.5 * np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / lam)
    elif kind == "spots":
        field01 = (value_noise(rng, h, w, rng.uniform(3, 6), 2, 0.5) > 0.5).astype(np.float32)
    else:  # rings
        r = np.hypot(xx - w / 2, yy - h / 2)
        field01 = 0.5 + 0.5 * np.cos(r * 2 * math.pi / rng.uniform(4, 8))
    detail = value_noise(rng, h, w, 2.0, 2, 0.5)
    return _colormap(np.clip(0.8 * field01 + 0.2 * detail, 0, 1), palette)


def make_sprite(obj: ObjectPlan, topic: Topic) -> np.ndarray:
    """Premultiplied RGBA sprite of ``(h + 2, w + 2, 4)`` float32 (1 px transparent border)."""
    rng = np.random.default_rng(obj.seed)
    w, h = obj.size
    alpha = _shape_mask(obj.kind, w, h, rng)
    palette = topic.object_palette[rng.permutation(3)]
    rgb = _pattern(obj.pattern, w, h, palette, rng)
    out = np.zeros((h + 2, w + 2, 4), np.float32)
    out[1:-1, 1:-1, :3] = rgb * alpha[..., None]
    out[1:-1, 1:-1, 3] = alpha
    return out
