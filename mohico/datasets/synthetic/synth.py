"""Synthetic untrimmed videos with known ground truth: the project's demo and test data.

Each video has a *topic* (a family of background palettes/textures and object kinds, shared by all
its shots and by every video of that topic) and several *shots* separated by hard cuts. A shot is a
textured background (multi-octave value noise + oriented sinusoids, per-frame sensor noise) with an
optional camera pan (sub-pixel translation of a larger canvas), and 0-3 textured objects moving on
their own bouncing trajectories; motion level 0 shots are (nearly) static.

``synthesize(out_dir, videos, seed, ...)`` writes ``video_{i:05d}.webm`` (VP9) or ``.mp4`` (H.264)
and ``video_{i:05d}.json``:

- ``topic``, ``topics``, ``fps``, ``num_frames``, ``width``, ``height``, ``codec``, ``file``, ``gop``,
  ``seed``, ``index``, ``generator`` (name + version), ``cuts`` (first frame of every shot but the first);
- ``shots``: ``[{start, end (exclusive), motion_level (0 static .. 3 fast), pan: [vx, vy], static,
  speed (fastest motion, px/frame), noise_sigma, objects: [{id, kind, pattern, size: [w, h],
  position: [x, y] at start, velocity: [vx, vy] at start}]}]``;
- ``boxes[f] = [[obj_id, x, y, w, h], ...]``: boxes of the objects visible in frame ``f`` (pixel
  coordinates of the encoded frame, clipped to it; later objects are drawn on top);
- ``camera[f] = [tx, ty]``: cumulative background translation in px. Inside a shot
  ``camera[f+1] - camera[f] == pan``; it does not jump at a cut.

``pan`` and object velocities are motions in the image (what optical flow measures): the background
pixel at (x, y) in frame f is at (x + vx, y + vy) in frame f + 1. Objects bounce off the frame
borders (the velocity component flips). All motions are multiples of 1/16 px, so the JSON is exact.

Deterministic: video ``i`` depends only on ``(seed, i)`` (and on ``(seed, topic)`` for its topic),
not on how many videos are made. VP9 and H.264 outputs are byte-identical across runs (single
encoder thread, bit-exact muxing). Frames are streamed to the encoder one at a time; each file is
written under a temporary name and renamed, so an interrupted run leaves no partial file.
``labels.json`` in ``out_dir`` maps each video file name to its topic (``mohico shards --labels``).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from mohico.datasets.synthetic.synth_motion import MOTION_CLASSES, STYLES_PER, synthesize_motion_one
from mohico.datasets.synthetic.synth_scene import (ShotPlan, Topic, background_canvas, make_sprite, make_topic,
                                                   plan_shots)
from mohico.datasets.synthetic.synth_video import (CODECS, GOP, clip_box, encode_video, paste_sprite, rgb_to_yuv420p,
                                                   video_name)
from mohico.errors import MohicoError, UsageError
from mohico.utils import atomic_write_json

log = logging.getLogger(__name__)

GENERATOR = "mohico-synth"
TASKS = ("scenes", "motion")
LABELS = "labels.json"  # {video file name: topic} for every video made in the folder
VERSION = 1
class _ShotRenderer:
    """Renders the frames of one shot: background canvas crop + sprites + sensor noise."""

    def __init__(self, shot: ShotPlan, topic: Topic, width: int, height: int):
        self.shot, self.width, self.height = shot, width, height
        n = shot.end - shot.start
        vx, vy = shot.pan
        extra_x, extra_y = int(math.ceil(abs(vx) * (n - 1))), int(math.ceil(abs(vy) * (n - 1)))
        self.canvas = background_canvas(shot, topic, height + extra_y + 4, width + extra_x + 4,
                                        scale=min(width, height) / 120.0)
        # canvas x of the visible frame's left edge at local frame k is ox - vx * k
        self.origin = (max(vx, 0.0) * (n - 1) + 2.0, max(vy, 0.0) * (n - 1) + 2.0)
        self.sprites = [make_sprite(o, topic) for o in shot.objects]
        self.positions = [o.positions(n, width, height) for o in shot.objects]
        self.noise = np.random.default_rng([shot.seed, 3])

    def frame(self, k: int) -> np.ndarray:
        """Local frame ``k`` of the shot: ``(H, W, 3)`` float32 RGB in [0, 255]."""
        W, H = self.width, self.height
        vx, vy = self.shot.pan
        center = (self.origin[0] - vx * k + (W - 1) / 2.0, self.origin[1] - vy * k + (H - 1) / 2.0)
        img = cv2.getRectSubPix(self.canvas, (W, H), center)
        for sprite, pos in zip(self.sprites, self.positions):
            paste_sprite(img, sprite, float(pos[k, 0]), float(pos[k, 1]))
        img += self.sensor_noise(img.shape)
        return np.clip(img, 0.0, 255.0, out=img)

    def sensor_noise(self, shape: tuple[int, ...]) -> np.ndarray:
        """Fresh zero-mean triangular noise (sum of two uniform bytes) with std ``noise_sigma``:
        close to Gaussian sensor noise at a quarter of the cost of ``standard_normal``."""
        raw = np.frombuffer(self.noise.bytes(2 * int(np.prod(shape))), np.uint8).reshape((2, *shape))
        noise = raw[0].astype(np.float32)
        noise += raw[1]
        noise -= 255.0
        noise *= np.float32(self.shot.noise_sigma / 104.5)  # std of the sum of two uniform bytes
        return noise


def _ground_truth(index: int, seed: int, topic: int, topics: int, shots: list[ShotPlan], fps, width: int,
                  height: int, codec: str, file: str) -> dict:
    num_frames = shots[-1].end
    boxes: list[list] = [[] for _ in range(num_frames)]
    camera: list[list[float]] = []
    tx = ty = 0.0
    for shot in shots:
        n = shot.end - shot.start
        for k in range(n):
            if k:
                tx, ty = tx + shot.pan[0], ty + shot.pan[1]
            camera.append([tx, ty])
        for obj in shot.objects:
            for k, (x, y) in enumerate(obj.positions(n, width, height)):
                box = clip_box(obj.id, float(x), float(y), float(obj.size[0]), float(obj.size[1]), width, height)
                if box is not None:
                    boxes[shot.start + k].append(box)
    return {
        "generator": {"name": GENERATOR, "version": VERSION},
        "seed": seed, "index": index, "file": file, "codec": codec, "gop": GOP,
        "topic": topic, "topics": topics,
        "fps": fps, "num_frames": num_frames, "width": width, "height": height,
        "duration": num_frames / fps,
        "cuts": [s.start for s in shots[1:]],
        "shots": [{
            "start": s.start, "end": s.end, "motion_level": s.motion_level, "pan": list(s.pan),
            "static": s.static, "speed": s.speed, "noise_sigma": round(s.noise_sigma, 4),
            "objects": [{"id": o.id, "kind": o.kind, "pattern": o.pattern, "size": list(o.size),
                         "position": list(o.position), "velocity": list(o.velocity)} for o in s.objects],
        } for s in shots],
        "boxes": boxes,
        "camera": camera,
    }


def synthesize_one(out_dir: str | os.PathLike, index: int, seed: int, codec: str = "vp9", fps=15,
                   size: tuple[int, int] = (160, 120), duration: float = 12.0, topics: int = 4) -> Path:
    """Write video ``index`` of the dataset ``seed`` and its ground truth; returns the video path."""
    width, height = size
    num_frames = int(round(duration * fps))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, index]))
    topic_id = index % topics
    topic = make_topic(topic_id, topics, seed)
    shots = plan_shots(rng, num_frames, fps, width, height, topic)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / video_name(index, codec)

    def frames():
        for shot in shots:
            renderer = _ShotRenderer(shot, topic, width, height)
            for k in range(shot.end - shot.start):
                yield rgb_to_yuv420p(renderer.frame(k))

    encode_video(path, codec, fps, width, height, frames())
    gt = _ground_truth(index, seed, topic_id, topics, shots, fps, width, height, codec, path.name)
    atomic_write_json(path.with_suffix(".json"), gt, indent=None)
    return path


def _check_args(videos, seed, codec, fps, size, duration, topics, workers) -> None:
    def bad(msg):
        raise UsageError(msg)

    if not isinstance(videos, numbers.Integral) or isinstance(videos, bool) or videos < 1:
        bad(f"videos (--videos) must be an integer >= 1, got {videos!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        bad(f"seed (--seed) must be an integer >= 0, got {seed!r}")
    if codec not in CODECS:
        bad(f"codec (--codec) must be one of {sorted(CODECS)}, got {codec!r}")
    if not (isinstance(fps, numbers.Real) and 0 < fps <= 240):
        bad(f"fps (--fps) must be in (0, 240], got {fps!r}")
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        bad(f"size (--size) must be (width, height), got {size!r}")
    if w < 32 or h < 32 or w % 2 or h % 2 or (w, h) != tuple(size):
        bad(f"size (--size) must be even integers >= 32, got {size!r}")
    if not (isinstance(duration, numbers.Real) and duration > 0 and round(duration * fps) >= 2):
        bad(f"duration (--duration) must give at least 2 frames at {fps} fps, got {duration!r}")
    if not isinstance(topics, numbers.Integral) or isinstance(topics, bool) or topics < 1:
        bad(f"topics (--topics) must be an integer >= 1, got {topics!r}")
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 1:
        bad(f"workers (--workers) must be an integer >= 1, got {workers!r}")


def synthesize(out_dir: str | os.PathLike, videos: int, seed: int, codec: str = "vp9", fps=15,
               size: tuple[int, int] = (160, 120), duration: float = 12.0, topics: int = 4,
               workers: int = 1, task: str = "scenes", first: int = 0, motion_style: str = "video") -> list[Path]:
    """Write ``videos`` synthetic videos + ground truth JSON into ``out_dir``; returns the video paths.

    ``task="scenes"``: the topic videos above (label = topic); ``task="motion"``: the motion
    benchmark of :mod:`mohico.datasets.synthetic.synth_motion` (label = motion class name; ``topics`` unused).
    ``first``: the index of the first video (videos ``first .. first + videos - 1``; video ``i`` is
    the same whatever the range, so two ranges of one seed are disjoint splits of one dataset).
    ``motion_style`` (motion task): one motion style (speed, amplitude, ...) per ``"video"``, kept
    across its shots, or a new one per ``"shot"``.
    ``workers > 1`` renders videos in that many processes (same bytes as ``workers=1``).
    Existing files of the same names are replaced.
    """
    if task not in TASKS:
        raise UsageError(f"task (--task) must be one of {', '.join(TASKS)}, got {task!r}")
    _check_args(videos, seed, codec, fps, size, duration, topics, workers)
    if motion_style not in STYLES_PER:
        raise UsageError(f"motion_style (--motion-style) must be one of {', '.join(STYLES_PER)}, got {motion_style!r}")
    if not isinstance(first, numbers.Integral) or isinstance(first, bool) or first < 0:
        raise UsageError(f"first (--first) must be an integer >= 0, got {first!r}")
    first = int(first)
    videos, seed, topics, workers = int(videos), int(seed), int(topics), int(workers)
    fps = int(fps) if float(fps).is_integer() else float(fps)
    size = (int(size[0]), int(size[1]))
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MohicoError(f"cannot create output folder {out_dir}: {e}") from e
    kwargs = dict(seed=seed, codec=codec, fps=fps, size=size, duration=float(duration))
    one = synthesize_one
    if task == "motion":
        one = synthesize_motion_one
        kwargs["style_per"] = motion_style
    else:
        kwargs["topics"] = topics
    step = max(1, videos // 10)

    def done(i: int) -> None:
        if (i + 1) % step == 0 or i + 1 == videos:
            log.info("%d/%d videos written to %s", i + 1, videos, out_dir)

    paths = []
    if workers == 1 or videos == 1:
        for i in range(first, first + videos):
            paths.append(one(out_dir, i, **kwargs))
            done(i - first)
    else:
        with ProcessPoolExecutor(min(workers, videos), mp_context=get_context("spawn"),
                                 initializer=cv2.setNumThreads, initargs=(1,)) as pool:
            futures = [pool.submit(one, out_dir, i, **kwargs) for i in range(first, first + videos)]
            for i, f in enumerate(futures):
                paths.append(f.result())
                done(i)
    if task == "motion":
        _update_labels(out_dir / LABELS, {p.name: MOTION_CLASSES[i % len(MOTION_CLASSES)]
                                          for i, p in enumerate(paths, first)})
    else:
        _update_labels(out_dir / LABELS, {p.name: i % topics for i, p in enumerate(paths, first)})
    return paths


def _update_labels(path: Path, labels: dict[str, int]) -> None:
    """Merge ``{video file name: topic}`` into ``path`` (``mohico shards --labels`` reads it)."""
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if not isinstance(old, dict):
            old = {}
    atomic_write_json(path, {**old, **labels})
