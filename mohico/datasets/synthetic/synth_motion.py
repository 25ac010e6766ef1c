"""A motion benchmark where appearance is a distractor (``mohico synth --task motion``).

Every video has one *motion class*, the label; everything about its appearance is drawn
independently of that label, so only how things move tells the classes apart. A video is one
scene (a random background: hue, value-noise texture, stripes, brightness) filmed in shots
(2-5 s, hard cuts); at every cut the actors change: 1-2 new random textured objects (shape,
pattern, palette, size). Within a shot the motion runs for 35-65% of its frames, with still
stretches before and after (objects present but motionless), as in untrimmed video. How a video
moves is its own :class:`MotionStyle` (peak speed, swing amplitude, zoom amplitude, pan
direction, circling sense), kept across its shots with a 10% jitter and drawn independently of
the label; phases and positions are drawn per object and shot.

So two clips of one video share the scene and the way things move, but not the actors: an
encoder that keys on the background solves instance discrimination without seeing the motion
(the appearance shortcut motion-focused learning is meant to avoid), and one that looks at the
moving regions finds there only the motion style and short-lived actors.

``style_per="shot"`` (``mohico synth --motion-style shot``) draws a new :class:`MotionStyle` at
every cut instead, with the shot's new actors: two clips of one video from different shots then
share only the scene and the class, and the per-video style is no longer a label-independent cue
for instance discrimination to learn (it was not what held MCL's kNN back:
benchmarks/reports/2026-11-26-motion-benchmark-style-width-oracle.md).

Classes (``MOTION_CLASSES``; each is invariant to a horizontal flip, the training augmentation):

- ``horizontal``: objects swing left-right along a line (sinusoid), camera still;
- ``vertical``: objects swing up-down, camera still;
- ``circular``: objects go round a circle (either sense), camera still;
- ``zoom``: objects stay in place and grow and shrink (scale change), camera still;
- ``camera``: the camera pans at constant velocity (any direction) over a still scene: background
  and objects move together (camera motion, not object motion).

Motion is parameterised by the *moving time* ``tau(k)``: 0 during the first still stretch, +1 per
frame while moving, frozen after, so positions and sizes are continuous at the stops.

Ground truth ``video_NNNNN.json``: ``task: "motion"``, ``label`` (class name), ``label_index``,
``classes``, ``fps``, ``num_frames``, ``width``, ``height``, ``codec``, ``file``, ``seed``,
``index``, ``generator``, ``cuts``, ``style_per``, ``style`` (the video's MotionStyle; absent with
``style_per="shot"``), ``shots: [{start, end, style (the shot's MotionStyle), moving: [m0, m1) absolute frames,
pan: [vx, vy] px/frame while moving, objects: [{kind, pattern, size: [w, h], amplitude, speed,
...}]}]``, ``boxes[f] = [[obj, x, y, w, h], ...]`` (clipped to the frame) and
``moving[f]`` (1 while the shot's motion runs). ``labels.json`` maps each file to its class name.
Deterministic: video ``i`` depends only on ``(seed, i)``; its class is ``MOTION_CLASSES[i % 5]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mohico.datasets.synthetic.synth_scene import (PATTERNS, SHAPES, ObjectPlan, ShotPlan, background_canvas,
                                                   make_sprite, make_topic, shot_bounds)
from mohico.datasets.synthetic.synth_video import clip_box, encode_video, paste_sprite, rgb_to_yuv420p, video_name
from mohico.utils import atomic_write_json

GENERATOR = "mohico-synth-motion"
VERSION = 2
MOTION_CLASSES = ("horizontal", "vertical", "circular", "zoom", "camera")
MOVING_FRACTION = (0.35, 0.65) # share of each shot's frames in motion
SPEED = (3.0, 5.0)             # peak speed, px/frame at 15 fps and a 120 px short side
SHOT_SECONDS = (2.0, 5.0)      # shot length between hard cuts
OBJECTS = (1, 2)               # objects per shot, inclusive
OBJECT_SIDE = (0.25, 0.4)      # object width as a share of the short side
STYLE_JITTER = 0.1             # per-shot (speed) and per-object (amplitude) relative jitter of the MotionStyle
STYLES_PER = ("video", "shot")  # one MotionStyle per video (the default) or a new one at every cut
NOISE_SIGMA = (1.0, 2.5)       # per-frame sensor noise, 0..255


@dataclass
class MovingObject:
    """One object of a shot; ``centre`` in frame px at tau = 0 (world px for ``camera``)."""
    plan: ObjectPlan                # shape, pattern, base size (w, h), texture seed
    centre: tuple[float, float]
    amplitude: float                # px (swing / radius) or log-scale amplitude (zoom)
    omega: float                    # rad per moving frame
    phase: float
    sense: float                    # +1 / -1: circular direction

    def state(self, cls: str, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centres ``(n, 2)`` and scale factors ``(n,)`` at moving times ``tau: (n,)``."""
        a, w, p = self.amplitude, self.omega, self.phase
        c = np.tile(np.asarray(self.centre, np.float64), (len(tau), 1))
        scale = np.ones(len(tau))
        if cls == "horizontal":
            c[:, 0] += a * (np.sin(w * tau + p) - math.sin(p))
        elif cls == "vertical":
            c[:, 1] += a * (np.sin(w * tau + p) - math.sin(p))
        elif cls == "circular":
            c[:, 0] += a * (np.cos(w * tau + p) - math.cos(p))
            c[:, 1] += self.sense * a * (np.sin(w * tau + p) - math.sin(p))
        elif cls == "zoom":
            scale = np.exp(a * np.sin(w * tau))
        return c, scale


@dataclass
class MotionShot:
    start: int
    end: int                        # exclusive
    m0: int                         # first moving frame (absolute)
    m1: int                         # first still frame after the motion (absolute)
    pan: tuple[float, float]        # camera: background velocity in the image, px/frame
    objects: list[MovingObject]
    style: "MotionStyle"            # how this shot's actors move (the video's with style_per="video")
    look: ShotPlan                  # background seed and gain (the video's scene), this shot's noise
    hue_seed: int                   # this shot's object palette
    scene_hue_seed: int = 0         # the video's background palette and texture family
    canvas_hw: tuple[int, int] = (0, 0)   # background canvas (h, w), the same for every shot of a video

    def tau(self) -> np.ndarray:
        """Moving time of each of the shot's frames: ``(end - start,)`` float64."""
        k = np.arange(self.start, self.end, dtype=np.float64)
        return np.clip(k - self.m0, 0.0, float(self.m1 - self.m0))


@dataclass
class MotionStyle:
    """How one video moves, kept across its shots (one actor, one way of moving, many shots):
    the peak speed (px/frame), the swing amplitude as a share of the free span, the zoom's
    log-scale amplitude, the pan direction and the circling sense. Each shot jitters them by
    ``STYLE_JITTER``; the objects are redrawn at every cut. With ``style_per="shot"`` every cut
    draws a new one."""
    speed: float
    amp_frac: float
    zoom_amp: float
    pan_angle: float
    sense: float

    @classmethod
    def draw(cls, rng: np.random.Generator, per_frame: float) -> "MotionStyle":
        return cls(speed=rng.uniform(*SPEED) * per_frame, amp_frac=rng.uniform(0.35, 0.6),
                   zoom_amp=rng.uniform(0.3, 0.45), pan_angle=rng.uniform(0, 2 * math.pi),
                   sense=float(rng.choice((-1.0, 1.0))))


def _jitter(rng: np.random.Generator) -> float:
    return float(rng.uniform(1.0 - STYLE_JITTER, 1.0 + STYLE_JITTER))


def plan_motion_video(rng: np.random.Generator, cls: str, num_frames: int, fps: float, width: int,
                      height: int, style_per: str = "video") -> list[MotionShot]:
    """Shots of one video of class ``cls``: a :class:`MotionStyle` for the video (``style_per="shot"``:
    for each shot), then per shot its cut points, still stretches, appearance and objects, all
    drawn from ``rng``."""
    if style_per not in STYLES_PER:
        raise ValueError(f"style_per must be one of {STYLES_PER}, got {style_per!r}")
    min_len, max_len = (max(6, int(round(s * fps))) for s in SHOT_SECONDS)
    bounds = shot_bounds(num_frames, min_len, max_len, rng)
    side = min(width, height)
    per_frame = side / 120.0 * 15.0 / fps
    style = MotionStyle.draw(rng, per_frame)          # the video's, or its first shot's
    scene_seed, scene_hue_seed, scene_gain = int(rng.integers(2**31)), int(rng.integers(2**31)), rng.uniform(0.8, 1.2)
    shots = []
    for s, e in bounds:
        if style_per == "shot" and shots:
            style = MotionStyle.draw(rng, per_frame)
        n = e - s
        moving = max(2, int(round(rng.uniform(*MOVING_FRACTION) * n)))
        m0 = s + int(rng.integers(0, n - moving + 1))
        speed = style.speed * _jitter(rng)
        pan = (0.0, 0.0)
        if cls == "camera":
            ang = style.pan_angle + rng.uniform(-1.0, 1.0) * STYLE_JITTER * math.pi
            pan = (speed * math.cos(ang), speed * math.sin(ang))
        objects = []
        for _ in range(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))):
            w = int(rng.uniform(*OBJECT_SIDE) * side)
            h = int(np.clip(w * rng.uniform(0.75, 1.33), 0.2 * side, 0.5 * side))
            plan = ObjectPlan(id=len(objects), kind=str(rng.choice(SHAPES)), pattern=str(rng.choice(PATTERNS)),
                              size=(w, h), position=(0.0, 0.0), velocity=(0.0, 0.0), seed=int(rng.integers(2**31)))
            omega, amp = 0.0, 0.0
            if cls in ("horizontal", "vertical", "circular"):
                span = (width - w) / 2 if cls == "horizontal" else (height - h) / 2 if cls == "vertical" \
                    else min(width - w, height - h) / 2
                amp = min(style.amp_frac * _jitter(rng) * span, span)
                omega = speed / max(amp, 1.0)
            elif cls == "zoom":
                amp = style.zoom_amp * _jitter(rng)                 # size x exp(+-amp)
                omega = speed / max(0.5 * w * amp, 1.0)             # edges move ~speed px/frame
            phase = rng.uniform(0, 2 * math.pi)
            mo = MovingObject(plan, (0.0, 0.0), amp, omega, phase, style.sense)
            # place the centre so the whole path stays inside the frame (world = frame at tau 0)
            tau = np.linspace(0.0, moving, 64)
            path, scale = mo.state(cls, tau)
            lo = np.max(-path + (np.asarray(plan.size) * scale[:, None].max()) / 2, axis=0)
            hi = np.min(np.array([width, height]) - path - (np.asarray(plan.size) * scale.max()) / 2, axis=0)
            mo.centre = tuple(float(rng.uniform(a, b)) if b > a else float((a + b) / 2) for a, b in zip(lo, hi))
            objects.append(mo)
        look = ShotPlan(start=s, end=e, motion_level=2, pan=pan, noise_sigma=float(rng.uniform(*NOISE_SIGMA)),
                        seed=scene_seed, gain=float(scene_gain), hue_shift=0.0)
        shots.append(MotionShot(s, e, m0, m0 + moving, pan, objects, style, look, int(rng.integers(2**31)), scene_hue_seed))
    # one canvas size per video, large enough for the longest pan, so every shot shows the same scene
    travel = np.array([[abs(sh.pan[1]), abs(sh.pan[0])] for sh in shots]) * \
        np.array([sh.m1 - sh.m0 for sh in shots])[:, None]
    canvas = (int(math.ceil(height + travel[:, 0].max())) + 4, int(math.ceil(width + travel[:, 1].max())) + 4)
    for sh in shots:
        sh.canvas_hw = canvas
    return shots


def _resize_sprite(sprite: np.ndarray, scale: float) -> np.ndarray:
    """The premultiplied RGBA sprite (1 px border) scaled by ``scale`` about its box."""
    if abs(scale - 1.0) < 1e-6:
        return sprite
    h, w = sprite.shape[0] - 2, sprite.shape[1] - 2
    nw, nh = max(2, int(round(w * scale))), max(2, int(round(h * scale)))
    out = np.zeros((nh + 2, nw + 2, 4), np.float32)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out[1:-1, 1:-1] = cv2.resize(sprite[1:-1, 1:-1], (nw, nh), interpolation=interp)
    return out


class MotionShotRenderer:
    """Frames of one shot: a (panned) background crop plus scaled, moving sprites and noise."""

    def __init__(self, shot: MotionShot, cls: str, width: int, height: int):
        self.shot, self.cls, self.width, self.height = shot, cls, width, height
        scene = make_topic(0, 1, shot.scene_hue_seed)     # the video's background palette and texture family
        topic = make_topic(0, 1, shot.hue_seed)           # this shot's object palette
        self.topic = topic
        tau = shot.tau()
        vx, vy = shot.pan
        self.canvas = background_canvas(shot.look, scene, *shot.canvas_hw, scale=min(width, height) / 120.0)
        # frame (0, 0) sits at canvas (ox, oy) at tau 0; the background moves by +pan per frame in the image
        self.origin = (max(vx, 0.0) * tau[-1] + 2.0, max(vy, 0.0) * tau[-1] + 2.0)
        self.sprites = [make_sprite(o.plan, topic) for o in shot.objects]
        self.states = [o.state(cls, tau) for o in shot.objects]
        self.tau = tau
        self.noise = np.random.default_rng([shot.look.seed, 5, shot.start])

    def camera(self, k: int) -> tuple[float, float]:
        """Image translation of the world at local frame ``k``: ``pan * tau``."""
        return self.shot.pan[0] * self.tau[k], self.shot.pan[1] * self.tau[k]

    def boxes(self, k: int) -> list[list[float]]:
        """``[obj, x, y, w, h]`` of every object at local frame ``k`` (unclipped, frame px)."""
        tx, ty = self.camera(k)
        out = []
        for i, (o, (centres, scales)) in enumerate(zip(self.shot.objects, self.states)):
            w, h = o.plan.size[0] * scales[k], o.plan.size[1] * scales[k]
            out.append([i, centres[k, 0] + tx - w / 2, centres[k, 1] + ty - h / 2, w, h])
        return out

    def frame(self, k: int) -> np.ndarray:
        """Local frame ``k``: ``(H, W, 3)`` float32 RGB in [0, 255]."""
        W, H = self.width, self.height
        tx, ty = self.camera(k)
        centre = (self.origin[0] - tx + (W - 1) / 2.0, self.origin[1] - ty + (H - 1) / 2.0)
        img = cv2.getRectSubPix(self.canvas, (W, H), centre)
        for sprite, (_, scales), box in zip(self.sprites, self.states, self.boxes(k)):
            s = _resize_sprite(sprite, float(scales[k]))
            paste_sprite(img, s, box[1], box[2])
        img += self.noise.normal(0.0, self.shot.look.noise_sigma, img.shape).astype(np.float32)
        return np.clip(img, 0.0, 255.0, out=img)


def _style_json(style: MotionStyle) -> dict:
    return {k: round(float(v), 5) for k, v in vars(style).items()}


def synthesize_motion_one(out_dir, index: int, seed: int, codec: str = "vp9", fps=15,
                          size: tuple[int, int] = (64, 64), duration: float = 8.0, style_per: str = "video") -> Path:
    """Write motion video ``index`` of dataset ``seed`` and its ground truth; returns the video path.
    ``style_per``: one :class:`MotionStyle` per ``"video"`` or per ``"shot"``."""
    width, height = size
    num_frames = int(round(duration * fps))
    label_index = index % len(MOTION_CLASSES)
    cls = MOTION_CLASSES[label_index]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, index]))
    shots = plan_motion_video(rng, cls, num_frames, fps, width, height, style_per)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / video_name(index, codec)
    boxes: list[list] = []
    renderers = [MotionShotRenderer(s, cls, width, height) for s in shots]

    def frames():
        for shot, r in zip(shots, renderers):
            for k in range(shot.end - shot.start):
                clipped = [clip_box(int(b[0]), *b[1:], width, height) for b in r.boxes(k)]
                boxes.append([[round(v, 3) for v in b] for b in clipped if b is not None])
                yield rgb_to_yuv420p(r.frame(k))

    encode_video(path, codec, fps, width, height, frames())
    gt = {
        "generator": {"name": GENERATOR, "version": VERSION}, "task": "motion",
        "seed": seed, "index": index, "file": path.name, "codec": codec,
        "label": cls, "label_index": label_index, "classes": list(MOTION_CLASSES),
        "fps": fps, "num_frames": num_frames, "width": width, "height": height, "duration": num_frames / fps,
        "cuts": [s.start for s in shots[1:]],
        "style_per": style_per,
        **({"style": _style_json(shots[0].style)} if style_per == "video" else {}),
        "shots": [{"start": s.start, "end": s.end, "style": _style_json(s.style), "moving": [s.m0, s.m1], "pan": [round(v, 4) for v in s.pan],
                   "objects": [{"kind": o.plan.kind, "pattern": o.plan.pattern, "size": list(o.plan.size),
                                "centre": [round(v, 3) for v in o.centre], "amplitude": round(o.amplitude, 4),
                                "omega": round(o.omega, 5), "phase": round(o.phase, 4), "sense": o.sense}
                               for o in s.objects]} for s in shots],
        "moving": [int(s.m0 <= f < s.m1) for s in shots for f in range(s.start, s.end)],
        "boxes": boxes,
    }
    atomic_write_json(path.with_suffix(".json"), gt, indent=None)
    return path
