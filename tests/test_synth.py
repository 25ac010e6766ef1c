"""Synthetic untrimmed videos: determinism, ground-truth consistency checked on decoded pixels, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from mohico.datasets.synthetic import synth
from mohico.datasets.synthetic.synth import synthesize, synthesize_one
from mohico.datasets.synthetic.synth_scene import LEVEL_SPEED, make_topic, plan_shots
from mohico.errors import MohicoError, UsageError

SEED, VIDEOS, TOPICS, DURATION = 7, 4, 2, 6.0


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """(path, gt, decoded RGB frames) for 4 six-second VP9 videos of 2 topics."""
    out = tmp_path_factory.mktemp("synth")
    paths = synthesize(out, videos=VIDEOS, seed=SEED, duration=DURATION, topics=TOPICS)
    return [(p, json.loads(p.with_suffix(".json").read_text()), decode(p)) for p in paths]


def test_files_and_ground_truth_layout(videos):
    assert [p.name for p, _, _ in videos] == [f"video_{i:05d}.webm" for i in range(VIDEOS)]
    labels = json.loads((videos[0][0].parent / "labels.json").read_text())
    assert labels == {p.name: gt["topic"] for p, gt, _ in videos}
    for i, (path, gt, frames) in enumerate(videos):
        n = gt["num_frames"]
        assert n == round(DURATION * 15) == len(frames), "decoded frame count must equal the ground truth"
        assert frames[0].shape == (gt["height"], gt["width"], 3) == (120, 160, 3)
        assert (gt["fps"], gt["codec"], gt["topic"], gt["index"], gt["seed"]) == (15, "vp9", i % TOPICS, i, SEED)
        shots = gt["shots"]
        assert shots[0]["start"] == 0 and shots[-1]["end"] == n
        assert all(a["end"] == b["start"] for a, b in zip(shots, shots[1:]))
        assert gt["cuts"] == [s["start"] for s in shots[1:]]
        assert len(gt["boxes"]) == len(gt["camera"]) == n
        for s in shots:
            assert s["static"] == (s["motion_level"] == 0)
            for o in s["objects"]:  # every object is in every frame of its shot, inside the frame
                for f in range(s["start"], s["end"]):
                    (box,) = [b for b in gt["boxes"][f] if b[0] == o["id"]]
                    _, x, y, w, h = box
                    assert 0 <= x and 0 <= y and x + w <= gt["width"] and y + h <= gt["height"]
                    assert [w, h] == o["size"]
        with av.open(str(path)) as c:  # keyframe at least every GOP frames: cheap seeking
            keys = [i for i, p in enumerate(p for p in c.demux(video=0) if p.size) if p.is_keyframe]
        assert keys[0] == 0 and max(np.diff(keys + [n])) <= synth.GOP


def test_same_seed_same_bytes_and_frames(tmp_path, videos):
    a = synthesize(tmp_path / "a", videos=2, seed=5, duration=2.0)
    b = synthesize(tmp_path / "b", videos=2, seed=5, duration=2.0)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.with_suffix(".json").read_text() == pb.with_suffix(".json").read_text()
    assert all(np.array_equal(x, y) for x, y in zip(decode(a[1]), decode(a[1])))
    # video i depends on (seed, i) only, not on how many videos are made
    alone = synthesize_one(tmp_path / "c", 1, seed=5, duration=2.0)
    assert alone.read_bytes() == a[1].read_bytes()
    other = synthesize(tmp_path / "d", videos=1, seed=6, duration=2.0)
    assert other[0].read_bytes() != a[0].read_bytes()
    # and the module fixture (seed 7) rebuilt alone gives the same file
    p0 = videos[0][0]
    again = synthesize_one(tmp_path / "e", 0, seed=SEED, duration=DURATION, topics=TOPICS)
    assert again.read_bytes() == p0.read_bytes()


def test_h264_deterministic_and_decodes(tmp_path):
    a = synthesize(tmp_path / "a", videos=1, seed=2, codec="h264", duration=2.0)[0]
    b = synthesize(tmp_path / "b", videos=1, seed=2, codec="h264", duration=2.0)[0]
    assert a.suffix == ".mp4" and a.read_bytes() == b.read_bytes()
    gt = json.loads(a.with_suffix(".json").read_text())
    assert len(decode(a)) == gt["num_frames"] == 30 and gt["codec"] == "h264"


def _simulate(o: dict, n: int, width: int, height: int) -> list[tuple[float, float]]:
    """Step-by-step bouncing (reference for the generator's closed-form triangle wave)."""
    (x, y), (vx, vy), (w, h) = o["position"], o["velocity"], o["size"]
    out = [(x, y)]
    for _ in range(n - 1):
        x, y = x + vx, y + vy
        if x < 0 or x > width - w:
            x, vx = (-x, -vx) if x < 0 else (2 * (width - w) - x, -vx)
        if y < 0 or y > height - h:
            y, vy = (-y, -vy) if y < 0 else (2 * (height - h) - y, -vy)
        out.append((x, y))
    return out


def test_boxes_move_by_velocity_and_bounce(videos):
    moved = bounced = 0
    for _, gt, _ in videos:
        for s in gt["shots"]:
            n = s["end"] - s["start"]
            for o in s["objects"]:
                track = [next(b for b in gt["boxes"][f] if b[0] == o["id"]) for f in range(s["start"], s["end"])]
                assert [(b[1], b[2]) for b in track] == _simulate(o, n, gt["width"], gt["height"])
                d = np.diff([[b[1], b[2]] for b in track], axis=0)
                free = np.all(np.abs(d) == np.abs(o["velocity"]), axis=1)  # frames without a bounce
                moved += int(free.sum())
                bounced += int((~free).sum())
                assert free.mean() > 0.8
    assert moved > 100 and bounced > 0


def _crop(img: np.ndarray, x: float, y: float, w: float, h: float) -> np.ndarray:
    return cv2.getRectSubPix(img.astype(np.float32), (int(w), int(h)), (x + (w - 1) / 2, y + (h - 1) / 2))


def _overlaps(a, b) -> bool:
    return not (a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1] or a[2] + a[4] <= b[2] or b[2] + b[4] <= a[2])


def test_object_texture_found_at_its_box(videos):
    """Decoded pixels: the crop at box(f+1) in frame f+1 matches the crop at box(f) in frame f
    much better than the crop at the old place box(f) in frame f+1."""
    ratios = []
    for _, gt, frames in videos:
        for f in range(gt["num_frames"] - 1):
            if f + 1 in gt["cuts"]:
                continue
            now = {b[0]: b for b in gt["boxes"][f]}
            nxt = {b[0]: b for b in gt["boxes"][f + 1]}
            for oid, a in now.items():
                b = nxt[oid]
                others = [o for q in (now, nxt) for j, o in q.items() if j != oid]
                if abs(b[1] - a[1]) + abs(b[2] - a[2]) < 2 or any(_overlaps(a, o) or _overlaps(b, o) for o in others):
                    continue
                ref = _crop(frames[f], *a[1:])
                match = np.abs(_crop(frames[f + 1], *b[1:]) - ref).mean()
                stale = np.abs(_crop(frames[f + 1], *a[1:]) - ref).mean()
                ratios.append(match / stale)
    ratios = np.array(ratios)
    assert len(ratios) > 100
    assert np.all(ratios < 1.0) and np.median(ratios) < 0.6


def _background_diff(a: np.ndarray, b: np.ndarray, boxes: list, pad: int = 4) -> float:
    """Mean |a - b| of blurred frames over pixels far from every object box (background only)."""
    keep = np.ones(a.shape[:2], bool)
    for _, x, y, w, h in boxes:
        keep[max(0, int(y) - pad): int(y + h) + pad + 1, max(0, int(x) - pad): int(x + w) + pad + 1] = False
    return float(np.abs(a - b)[keep].mean())


def test_cut_changes_background(videos):
    cuts = within = 0
    for _, gt, frames in videos:
        blurred = [cv2.GaussianBlur(f.astype(np.float32), (0, 0), 4) for f in frames]
        d = np.array([_background_diff(blurred[f], blurred[f + 1], gt["boxes"][f] + gt["boxes"][f + 1])
                      for f in range(gt["num_frames"] - 1)])
        at_cut = np.zeros(len(d), bool)
        at_cut[np.array(gt["cuts"], int) - 1] = True
        assert at_cut.any()
        assert d[at_cut].min() > max(10.0, 4 * d[~at_cut].max()), (d[at_cut], d[~at_cut].max())
        cuts += at_cut.sum()
        within += (~at_cut).sum()
    assert cuts >= VIDEOS and within > 300


def test_changes_stay_inside_object_boxes(videos):
    """In shots without a pan, pixels that change between frames lie inside the objects' boxes
    (catches objects drawn off their ground-truth boxes, even by 1 px)."""
    inside = outside = 0
    for _, gt, frames in videos:
        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in frames]
        for s in gt["shots"]:
            if s["pan"] != [0.0, 0.0]:
                continue
            for f in range(s["start"], s["end"] - 1):
                changed = np.abs(gray[f + 1] - gray[f]) > 25
                boxes = np.zeros_like(changed)
                for _, x, y, w, h in gt["boxes"][f] + gt["boxes"][f + 1]:
                    boxes[int(np.floor(y)): int(np.ceil(y + h)), int(np.floor(x)): int(np.ceil(x + w))] = True
                inside += int(changed[boxes].sum())
                outside += int(changed[~boxes].sum())
    assert inside > 10_000
    assert outside < 1e-3 * inside, (inside, outside)


def _estimate_shift(g0: np.ndarray, g1: np.ndarray, mask: np.ndarray, radius: int) -> tuple[float, float]:
    """Translation s minimising |g0(p) - g1(p + s)| on mask: integer search, then 1/8 px refinement."""
    def err(sx, sy):
        warped = cv2.warpAffine(g0, np.float32([[1, 0, sx], [0, 1, sy]]), g0.shape[::-1], flags=cv2.INTER_LINEAR)
        return float(np.abs(warped - g1)[mask].mean())

    _, bx, by = min((err(sx, sy), sx, sy) for sx in range(-radius, radius + 1) for sy in range(-radius, radius + 1))
    steps = np.arange(-1, 1.001, 0.125)
    _, fx, fy = min((err(bx + dx, by + dy), bx + dx, by + dy) for dx in steps for dy in steps)
    return fx, fy


def test_pan_matches_camera_ground_truth(videos):
    checked = 0
    for _, gt, frames in videos:
        H, W = gt["height"], gt["width"]
        for s in gt["shots"]:
            if s["pan"] == [0.0, 0.0] or s["end"] - s["start"] < 5:
                continue
            k0, k1 = s["start"] + 1, s["start"] + 3
            cam = np.subtract(gt["camera"][k1], gt["camera"][k0])
            assert np.array_equal(cam, 2 * np.array(s["pan"]))
            mask = np.zeros((H, W), bool)
            mask[8:-8, 8:-8] = True
            pad = int(np.abs(cam).max()) + 3
            for f in (k0, k1):  # background only: no pixels near an object
                for _, x, y, w, h in gt["boxes"][f]:
                    mask[max(0, int(y) - pad): int(y + h) + pad + 1, max(0, int(x) - pad): int(x + w) + pad + 1] = False
            g0, g1 = (cv2.cvtColor(frames[f], cv2.COLOR_RGB2GRAY).astype(np.float32) for f in (k0, k1))
            est = _estimate_shift(g0, g1, mask, radius=int(np.abs(cam).max()) + 3)
            assert np.abs(np.subtract(est, cam)).max() <= 0.375, (s, cam, est)
            checked += 1
    for _, gt, _ in videos:  # no jump at cuts; static shots do not move the camera
        for s in gt["shots"]:
            for f in range(s["start"] + 1, s["end"]):
                assert np.subtract(gt["camera"][f], gt["camera"][f - 1]).tolist() == s["pan"]
        for c in gt["cuts"]:
            assert gt["camera"][c] == gt["camera"][c - 1]
    assert checked >= 3


def test_shot_plans_cover_motion_levels():
    """Over many plans: static shots, pans, 0..3 objects; static = no pan and (nearly) still objects."""
    seen_levels, seen_counts, pans = set(), set(), 0
    topic = make_topic(0, 4, 0)
    for i in range(200):
        shots = plan_shots(np.random.default_rng(i), 120, 15, 160, 120, topic)
        for s in shots:
            seen_levels.add(s.motion_level)
            seen_counts.add(len(s.objects))
            pans += s.pan != (0.0, 0.0)
            lo, hi = LEVEL_SPEED[s.motion_level]
            speeds = [np.hypot(*o.velocity) for o in s.objects] + ([np.hypot(*s.pan)] if s.pan != (0.0, 0.0) else [])
            if s.static:
                assert s.pan == (0.0, 0.0) and all(v <= hi for v in speeds)
            else:
                assert speeds and all(lo - 0.1 <= v <= hi for v in speeds)  # quantised to 1/16 px
            assert 15 <= s.end - s.start <= 60 + 14
    assert seen_levels == {0, 1, 2, 3} and seen_counts == {0, 1, 2, 3} and pans > 100


def test_topics_share_colours(videos):
    """Videos of one topic share a palette: mean chroma closer within a topic than across."""
    chroma = []
    for _, gt, frames in videos:
        yuv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2YUV) for f in frames[::5]]).astype(np.float32)
        chroma.append(yuv[..., 1:].reshape(-1, 2).mean(0))
    topic = [gt["topic"] for _, gt, _ in videos]
    dist = np.linalg.norm(np.array(chroma)[:, None] - np.array(chroma)[None], axis=-1)
    same = [dist[i, j] for i in range(VIDEOS) for j in range(i) if topic[i] == topic[j]]
    diff = [dist[i, j] for i in range(VIDEOS) for j in range(i) if topic[i] != topic[j]]
    assert max(same) < min(diff), (same, diff)


def test_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    frame = synth._ShotRenderer.frame

    def failing(self, k):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return frame(self, k)

    monkeypatch.setattr(synth._ShotRenderer, "frame", failing)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path, videos=1, seed=0, duration=2.0)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise_usage_error(tmp_path):
    for kwargs in [dict(videos=0), dict(seed=-1), dict(codec="av1"), dict(fps=0), dict(size=(161, 120)),
                   dict(size=(16, 16)), dict(duration=0.05), dict(topics=0), dict(workers=0)]:
        args = dict(videos=1, seed=0) | kwargs
        with pytest.raises(UsageError, match=f"--{next(iter(kwargs))}"):
            synthesize(tmp_path, **args)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(MohicoError, match="cannot create output folder"):
        synthesize(tmp_path / "file" / "sub", videos=1, seed=0, duration=1.0)


def test_workers_give_same_bytes(tmp_path):
    a = synthesize(tmp_path / "a", videos=2, seed=4, duration=1.0, workers=2)
    b = synthesize(tmp_path / "b", videos=2, seed=4, duration=1.0, workers=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mohico", "synth", *args], capture_output=True, text=True)


def test_cli_writes_videos(tmp_path):
    out = tmp_path / "out"
    r = _cli(str(out), "--videos", "2", "--seed", "3", "--duration", "3")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "labels.json", "video_00000.json", "video_00000.webm", "video_00001.json", "video_00001.webm"]
    gt = json.loads((out / "video_00001.json").read_text())
    assert gt["num_frames"] == 45 and gt["seed"] == 3
    assert str(out) in r.stdout


@pytest.mark.parametrize("args", [["--videos", "0"], ["--size", "161x120"], ["--codec", "av1"],
                                  ["--duration", "0"], ["--seed", "-2"], ["--fps", "x"]])
def test_cli_bad_arguments_exit_2(tmp_path, args):
    r = _cli(str(tmp_path / "out"), *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip() and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
