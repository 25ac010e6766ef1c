"""The motion benchmark (`mohico synth --task motion`): labels are how things move, checked against
the ground truth boxes and against the decoded pixels; still stretches are still; ranges are splits."""
from __future__ import annotations

import itertools
import json

import av
import cv2
import numpy as np
import pytest

from mohico.datasets.synthetic.synth import synthesize
from mohico.datasets.synthetic.synth_motion import MOTION_CLASSES, plan_motion_video
from mohico.errors import UsageError

SEED, FPS, SIZE, DURATION = 3, 15, (64, 64), 5.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("motion")
    paths = synthesize(out, videos=5, seed=SEED, fps=FPS, size=SIZE, duration=DURATION, task="motion")
    return out, paths


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)]).astype(np.float32)


def _gt(path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def test_labels_cycle_through_the_classes(videos):
    out, paths = videos
    labels = json.loads((out / "labels.json").read_text())
    assert [labels[p.name] for p in paths] == list(MOTION_CLASSES)
    for p, cls in zip(paths, MOTION_CLASSES):
        gt = _gt(p)
        assert gt["label"] == cls and gt["task"] == "motion" and gt["num_frames"] == int(FPS * DURATION)
        assert len(gt["moving"]) == len(gt["boxes"]) == gt["num_frames"]


def test_each_shot_has_still_stretches_and_a_motion(videos):
    _, paths = videos
    for p in paths:
        gt = _gt(p)
        moving = np.array(gt["moving"])
        for s in gt["shots"]:
            m0, m1 = s["moving"]
            n = s["end"] - s["start"]
            assert s["start"] <= m0 < m1 <= s["end"]
            assert 0.3 * n <= m1 - m0 <= 0.7 * n             # 35-65% of the shot, rounded
            assert moving[s["start"]:s["end"]].sum() == m1 - m0


def _box_track(gt, shot) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) and sizes (n, 2) of object 0 over the shot's moving stretch (+ 1 frame)."""
    m0, m1 = shot["moving"]
    rows = [next((b for b in gt["boxes"][f] if b[0] == 0), None) for f in range(m0, min(m1 + 1, shot["end"]))]
    if any(r is None for r in rows):
        return None, None                                   # the object left the frame (a long pan)
    b = np.array(rows, np.float64)
    return b[:, 1:3] + b[:, 3:5] / 2, b[:, 3:5]


@pytest.mark.parametrize("cls", MOTION_CLASSES)
def test_ground_truth_motion_is_the_class(videos, cls):
    """Unclipped objects: horizontal moves only in x, vertical only in y, circular in both with a
    constant radius, zoom changes size not centre, camera moves every object with the pan."""
    _, paths = videos
    gt = _gt(paths[MOTION_CLASSES.index(cls)])
    W, H = SIZE
    checked = 0
    if cls == "camera":                                     # a long pan takes objects out of frame: check frame pairs
        for shot in gt["shots"]:
            m0, m1 = shot["moving"]
            for f, obj in itertools.product(range(m0 + 1, m1), range(len(shot["objects"]))):
                pair = [next((x for x in gt["boxes"][g] if x[0] == obj), None) for g in (f - 1, f)]
                if any(x is None or x[1] <= 0 or x[2] <= 0 or x[1] + x[3] >= W or x[2] + x[4] >= H for x in pair):
                    continue
                checked += 1
                vel = np.array(pair[1][1:3]) - np.array(pair[0][1:3])
                assert np.allclose(vel, shot["pan"], atol=0.01) and np.hypot(*shot["pan"]) > 0.3
        assert checked >= 3, "the camera video never keeps an object whole in frame for two frames"
        return
    for shot in gt["shots"]:
        c, size = _box_track(gt, shot)
        if c is None or (c - size / 2).min() <= 0 or (c[:, 0] + size[:, 0] / 2).max() >= W or (c[:, 1] + size[:, 1] / 2).max() >= H:
            continue          # clipped at a border: the box is not the object's
        checked += 1
        dx, dy = np.ptp(c[:, 0]), np.ptp(c[:, 1])
        ds = np.ptp(size[:, 0])
        if cls == "horizontal":
            assert dx > 2.0 and dy < 1e-6 and ds < 1e-6
        elif cls == "vertical":
            assert dy > 2.0 and dx < 1e-6 and ds < 1e-6
        elif cls == "circular":
            assert dx > 1.0 and dy > 1.0 and ds < 1e-6
        elif cls == "zoom":
            assert ds > 2.0 and np.abs(c - c[0]).max() < 0.01
        else:
            vel = np.diff(c, axis=0)
            assert np.allclose(vel, shot["pan"], atol=0.01) and np.hypot(*shot["pan"]) > 0.3
    assert checked >= 1, f"no shot of the {cls} video keeps object 0 whole in frame"


def _shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    (sx, sy), _ = cv2.phaseCorrelate(a, b, cv2.createHanningWindow(a.shape[::-1], cv2.CV_32F))
    return np.array([sx, sy])


def test_pixels_move_only_while_the_shot_moves(videos):
    """Decoded frames: consecutive differences in still stretches are at the noise/codec level,
    several times smaller than in the moving stretches of the same shot."""
    _, paths = videos
    for p in paths:
        gt = _gt(p)
        fr = _frames(p)
        for s in gt["shots"]:
            m0, m1 = s["moving"]
            still = [f for f in range(s["start"] + 1, s["end"]) if not (m0 < f <= m1)]
            moving = list(range(m0 + 1, m1))
            if len(still) < 2 or len(moving) < 2:
                continue
            d = lambda fs: np.mean([np.abs(fr[f] - fr[f - 1]).mean() for f in fs])  # noqa: E731
            assert d(moving) > 2.0 * d(still), (p.name, s)


def test_camera_pan_is_measured_in_the_pixels(videos):
    """Phase correlation of consecutive decoded frames recovers the ground-truth pan."""
    _, paths = videos
    p = paths[MOTION_CLASSES.index("camera")]
    gt, fr = _gt(p), _frames(p)
    for s in gt["shots"]:
        m0, m1 = s["moving"]
        if m1 - m0 < 4:
            continue
        est = np.median([_shift(fr[f - 1], fr[f]) for f in range(m0 + 1, m1)], axis=0)
        assert np.allclose(est, s["pan"], atol=0.35), (est, s["pan"])


def test_a_later_range_is_the_same_videos(tmp_path, videos):
    """first=3 makes exactly videos 3 and 4 of the seed: a disjoint test split with distinct names."""
    out, paths = videos
    part = synthesize(tmp_path, videos=2, seed=SEED, fps=FPS, size=SIZE, duration=DURATION, task="motion", first=3)
    assert [q.name for q in part] == [paths[3].name, paths[4].name]
    for q in part:
        assert q.read_bytes() == (out / q.name).read_bytes()
    assert json.loads((tmp_path / "labels.json").read_text()) == {paths[3].name: "zoom", paths[4].name: "camera"}


def test_one_scene_and_one_motion_style_per_video_new_actors_per_shot(videos):
    """Across the cuts of a video: the background pixels (outside every object box, still camera)
    are the same scene, the objects are redrawn, and the motion keeps the video's style (speed
    within the 10% jitter; one circling sense)."""
    _, paths = videos
    for p in paths:
        gt = _gt(p)
        if len(gt["shots"]) < 2:
            continue
        style = gt["style"]
        assert gt["style_per"] == "video" and all(s["style"] == style for s in gt["shots"])
        a, b = gt["shots"][0], gt["shots"][1]
        assert [o["pattern"] + o["kind"] for o in a["objects"]] != [o["pattern"] + o["kind"] for o in b["objects"]] \
            or [o["size"] for o in a["objects"]] != [o["size"] for o in b["objects"]]
        if gt["label"] == "circular":
            assert {o["sense"] for s in gt["shots"] for o in s["objects"]} == {style["sense"]}
        if gt["label"] == "camera":
            for s in gt["shots"]:
                assert 0.9 * style["speed"] - 1e-3 <= float(np.hypot(*s["pan"])) <= 1.1 * style["speed"] + 1e-3
            continue
        fr = _frames(p)
        fa, fb = a["start"], b["start"]                      # first frames: both shots still, camera still
        free = np.ones(fr.shape[1:], bool)
        for f in (fa, fb):
            for _, x, y, w, h in gt["boxes"][f]:
                free[max(0, int(y) - 1):int(np.ceil(y + h)) + 1, max(0, int(x) - 1):int(np.ceil(x + w)) + 1] = False
        assert free.sum() > 200, p.name
        same = np.abs(fr[fa] - fr[fb])[free].mean()
        other = np.abs(fr[fa] - _frames(paths[(paths.index(p) + 1) % len(paths)])[0])[free].mean()
        assert same < 6.0 and other > 2 * same, (p.name, same, other)


def test_motion_style_per_shot_is_redrawn_at_every_cut(tmp_path):
    """``motion_style="shot"``: no video-level style; every shot has its own (its pan speed within
    the 10% jitter of it, one circling sense per shot), and a video's shots do not share it."""
    paths = synthesize(tmp_path, videos=5, seed=SEED, fps=FPS, size=SIZE, duration=10.0, task="motion",
                       motion_style="shot")
    multi = 0
    for p in paths:
        gt = _gt(p)
        assert gt["style_per"] == "shot" and "style" not in gt
        for s in gt["shots"]:
            if gt["label"] == "circular":
                assert {o["sense"] for o in s["objects"]} == {s["style"]["sense"]}
            if gt["label"] == "camera":
                assert 0.9 * s["style"]["speed"] - 1e-3 <= float(np.hypot(*s["pan"])) <= 1.1 * s["style"]["speed"] + 1e-3
        if len(gt["shots"]) > 1:
            multi += 1
            assert len({s["style"]["speed"] for s in gt["shots"]}) == len(gt["shots"])
    assert multi >= 3


@pytest.mark.parametrize("style_per", ["video", "shot"])
def test_a_shots_motion_style_follows_the_video_or_only_the_shot(style_per):
    """Over 300 planned videos, the first two shots' peak speeds and swing amplitudes: correlated
    when the style is the video's (only the 10% jitter apart), uncorrelated when drawn per shot; and
    every object swings at its shot's speed (omega * amplitude, within the jitter)."""
    first, second = [], []
    for i in range(300):
        rng = np.random.default_rng(np.random.SeedSequence([11, 7, i]))
        shots = plan_motion_video(rng, "horizontal", 120, 15, 128, 128, style_per)
        if len(shots) < 2:
            continue
        first.append([shots[0].style.speed, shots[0].style.amp_frac])
        second.append([shots[1].style.speed, shots[1].style.amp_frac])
        for sh in shots:
            for o in sh.objects:
                assert 0.9 * sh.style.speed - 1e-9 <= o.omega * max(o.amplitude, 1.0) <= 1.1 * sh.style.speed + 1e-9
    first, second = np.array(first), np.array(second)
    assert len(first) > 200
    for k in range(2):
        r = np.corrcoef(first[:, k], second[:, k])[0, 1]
        assert (r > 0.6) if style_per == "video" else (abs(r) < 0.2), (style_per, k, r)


def test_a_bad_motion_style_names_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--motion-style"):
        synthesize(tmp_path, videos=1, seed=0, size=SIZE, duration=1.0, task="motion", motion_style="clip")
    with pytest.raises(ValueError, match="style_per"):
        plan_motion_video(np.random.default_rng(0), "zoom", 30, 15, 64, 64, "clip")
