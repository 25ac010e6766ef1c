"""Shard writer: bad inputs skipped with reasons, VFR re-timed, metadata against decoded frames,
DALI index byte-identical to wds2idx, readable by webdataset and DALI, interrupted + resumed ==
uninterrupted (byte for byte), real camera clips, the CLI commands."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from _videos import object_frames, pan_frames, real_clip, write_video
from mohico.datasets.write import shards as S
from mohico.errors import MohicoError

GOOD = {"pan.webm", "obj.mp4", "sub/obj2.avi", "vfr.mkv"}
BAD = {  # source -> expected words in the reason
    "empty.mp4": "zero-byte",
    "notvideo.mp4": "not a readable media file",
    "trunc.webm": "truncated",
    "trunc.mp4": "not a readable media file",
    "badcodec.avi": "unreadable codec",
    "short.webm": "too short",
}
VFR_PTS = np.cumsum(np.r_[0, np.random.default_rng(0).choice([33, 66, 100], 39)]).tolist()   # ms


def make_src(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    write_video(root / "pan.webm", pan_frames(40, speed=(2, 1)))
    write_video(root / "obj.mp4", object_frames(40), codec="h264")
    write_video(root / "sub" / "obj2.avi", object_frames(20, seed=3), codec="mjpeg")
    write_video(root / "vfr.mkv", object_frames(40, seed=5), pts=VFR_PTS, time_base="1/1000")
    write_video(root / "short.webm", object_frames(8))
    (root / "empty.mp4").write_bytes(b"")
    (root / "notvideo.mp4").write_text("this is not a video\n")
    long_webm = write_video(root / "x.webm", object_frames(60)).read_bytes()
    (root / "trunc.webm").write_bytes(long_webm[: len(long_webm) // 2])
    (root / "x.webm").unlink()
    long_mp4 = write_video(root / "x.mp4", object_frames(40), codec="h264").read_bytes()
    (root / "trunc.mp4").write_bytes(long_mp4[: len(long_mp4) // 2])
    (root / "x.mp4").unlink()
    (root / "badcodec.avi").write_bytes((root / "sub" / "obj2.avi").read_bytes().replace(b"MJPG", b"QQQQ"))
    (root / "pan.json").write_text("{}")   # ground-truth side files are not inputs
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_src(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def written(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    man = S.write_shards(src, out, short_side=112, max_shard_size=120_000, labels={"pan.webm": "panning", "obj.mp4": 3})
    return out, man


def read_all(out: Path):
    """{key: {ext: bytes}} over all shards, in order."""
    samples = {}
    for t in sorted(out.glob("shard-*.tar")):
        with tarfile.open(t) as tar:
            for m in tar:
                k, _, ext = m.name.partition(".")
                samples.setdefault(k, {})[ext] = tar.extractfile(m).read()
    return samples


def test_manifest_counts_and_bad_inputs(written, src):
    out, man = written
    assert man["complete"] and man["inputs"]["count"] == len(GOOD) + len(BAD)
    reasons = {s["source"]: s["reason"] for s in man["skipped"]}
    assert set(reasons) == set(BAD)
    for name, words in BAD.items():
        assert words in reasons[name], (name, reasons[name])
    assert man["num_samples"] == len(GOOD) and man["num_skipped"] == len(BAD)
    assert man["num_shards"] >= 2 and len(man["shards"]) == man["num_shards"]
    keys = [k for s in man["shards"] for k in s["samples"]]
    assert sorted(keys) == sorted(S.sample_key(g) for g in GOOD)
    assert man["total_frames"] == sum(s["num_frames"] for s in man["shards"])
    assert man["total_hours"] == pytest.approx(man["total_frames"] / 15 / 3600)
    for s in man["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"] <= 120_000 or s["num_samples"] == 1
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text()) == man


def test_index_is_byte_identical_to_wds2idx(written, tmp_path):
    out, man = written
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for s in man["shards"]:
        ref = tmp_path / (s["name"] + ".idx")
        subprocess.run([str(wds2idx), str(out / s["name"]), str(ref)], check=True, capture_output=True)
        assert (out / s["index"]).read_bytes() == ref.read_bytes()


def test_metadata_matches_decoded_frames(written, src):
    import av
    import webdataset as wds

    from mohico.datasets.write.motion import MotionMapper, dequantise

    out, man = written
    tars = [str(out / s["name"]) for s in man["shards"]]
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False):
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        maps = np.load(io.BytesIO(sample["motion.npy"]))
        assert meta["key"] == key == S.sample_key(meta["source"]) and meta["source"] in GOOD
        assert meta["sha256"] == hashlib.sha256((src / meta["source"]).read_bytes()).hexdigest()
        assert meta["label"] == {"pan.webm": "panning", "obj.mp4": 3}.get(meta["source"])
        assert meta["codec"] == "vp9" and "webm" in sample and meta["fps"] == 15
        times, keyframes, greys = [], [], []
        with av.open(io.BytesIO(sample["webm"])) as c:
            st = c.streams.video[0]
            assert st.codec_context.name == "vp9"
            for i, pkt in enumerate(p for p in c.demux(st) if p.size):
                if pkt.is_keyframe:
                    keyframes.append(i)
            c.seek(0)
            for f in c.decode(st):
                times.append(f.time)
                assert (f.width, f.height) == (meta["width"], meta["height"])
                greys.append(f.to_ndarray(format="gray"))
        n = meta["num_frames"]
        assert len(times) == n == maps.shape[0] == len(meta["tmotion"])
        assert min(meta["width"], meta["height"]) == 112
        np.testing.assert_allclose(times, np.arange(n) / 15, atol=0.002)        # CFR
        assert meta["duration"] == pytest.approx(n / 15)
        assert keyframes[0] == 0 and max(np.diff(keyframes + [n])) <= 16        # GOP <= 16
        gh, gw = meta["motion"]["grid"]
        assert maps.dtype == np.uint8 and maps.shape == (n, gh, gw) == (n, meta["height"] // 8, meta["width"] // 8)
        # T-motion derivable from the stored maps; maps agree with flow on the decoded frames
        deq = dequantise(maps, meta["motion"]["scale"])
        np.testing.assert_allclose(deq.mean(axis=(1, 2)), meta["tmotion"], atol=meta["motion"]["scale"] / 255 + 1e-6, rtol=0.02)
        mm = MotionMapper("dis")
        for g in greys:
            mm.push(g)
        again, _ = mm.finish()
        if meta["source"] == "pan.webm":   # near-zero noise maps: compare levels, not patterns
            assert 0.5 < again.mean() / deq.mean() < 2
        else:
            assert np.corrcoef(again.ravel(), deq.ravel())[0, 1] > 0.9
        seen.add(meta["source"])
    assert seen == GOOD


def test_vfr_is_retimed_to_cfr(written):
    out, man = written
    meta = json.loads(read_all(out)[S.sample_key("vfr.mkv")]["json"])
    src_end = VFR_PTS[-1] / 1000 + VFR_PTS[-1] / 1000 / (len(VFR_PTS) - 1)
    assert meta["source_info"]["vfr"] is True
    assert meta["source_info"]["duration"] == pytest.approx(src_end, abs=1e-3)
    assert meta["num_frames"] == int(np.ceil(src_end * 15 - 1e-9))
    assert json.loads(read_all(out)[S.sample_key("pan.webm")]["json"])["source_info"]["vfr"] is False


def test_object_motion_peaks_pan_does_not(written):
    out, _ = written
    samples = read_all(out)
    def mean_map(name):
        m = json.loads(samples[S.sample_key(name)]["json"])
        return np.load(io.BytesIO(samples[S.sample_key(name)]["motion.npy"])).astype(np.float64) / 255 * m["motion"]["scale"]
    obj, pan = mean_map("obj.mp4"), mean_map("pan.webm")
    assert pan[:, 2:-2, 2:-2].mean() < 0.1 * obj.max(axis=(1, 2)).mean()
    # the object travels along rows 40..72 px of 120 (37..67 px stored, cells 4..8): its motion
    # peaks in that band and stays within one cell of it
    rows = obj.sum(axis=(0, 2))
    assert 4 <= rows.argmax() <= 8 and rows[3:10].sum() > 0.85 * rows.sum()


def test_dali_reads_shards_with_index(written):
    from nvidia.dali import fn, pipeline_def

    out, man = written
    tars = [str(out / s["name"]) for s in man["shards"]]
    idx = [str(out / s["index"]) for s in man["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        v, j, m = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["webm", "json", "motion.npy"],
                                        missing_component_behavior="error", name="reader")
        return fn.decoders.video(v, device="cpu"), j, m

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == len(GOOD)
    for _ in range(len(GOOD)):
        frames, j, m = p.run()
        meta = json.loads(np.array(j.at(0)).tobytes())
        f = np.array(frames.at(0))
        assert f.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        assert np.load(io.BytesIO(np.array(m.at(0)).tobytes())).shape[0] == meta["num_frames"]


def test_interrupted_then_resumed_equals_uninterrupted(src, written, tmp_path, monkeypatch):
    ref_out, ref = written
    out = tmp_path / "out"
    real = S.make_sample

    def crash_at_vfr(task):   # the last input: earlier shards are complete by then
        if task["source"] == "vfr.mkv":
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(S, "make_sample", crash_at_vfr)
    opts = dict(short_side=112, max_shard_size=120_000, labels={"pan.webm": "panning", "obj.mp4": 3})
    with pytest.raises(KeyboardInterrupt):
        S.write_shards(src, out, **opts)
    monkeypatch.setattr(S, "make_sample", real)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and 1 <= len(partial["shards"]) < ref["num_shards"]
    assert not list(out.glob("*.tmp"))
    # what a hard kill leaves behind: a partial temp shard and a renamed but unrecorded shard
    n = len(partial["shards"])
    (out / f"shard-{n:06d}.tar.tmp").write_bytes(b"partial")
    (out / f"shard-{n:06d}.tar").write_bytes(b"unrecorded")
    man = S.write_shards(src, out, workers=2, **opts)     # resumed, in worker processes
    assert man == ref
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in ref_out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    # a complete output is left alone; other options are refused with a clear error
    assert S.write_shards(src, out, **opts) == ref
    with pytest.raises(MohicoError, match="other options.*fps"):
        S.write_shards(src, out, short_side=112, max_shard_size=120_000, fps=10, labels=opts["labels"])


def test_file_list_input_and_labels_file(src, tmp_path):
    lst = tmp_path / "videos.txt"
    lst.write_text(f"# two videos\n{src / 'sub' / 'obj2.avi'}\n\n{src / 'empty.mp4'}\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("obj2.avi\tbird\n")
    man = S.write_shards(lst, tmp_path / "out", labels=labels, short_side=64)
    assert man["num_samples"] == 1 and [s["source"] for s in man["skipped"]] == [str(src / "empty.mp4")]
    meta = json.loads(next(iter(read_all(tmp_path / "out").values()))["json"])
    assert meta["label"] == "bird" and meta["height"] == 64 and meta["motion"]["grid"] == [8, 10]


@pytest.mark.slow
def test_real_camera_clips(tmp_path):
    src = tmp_path / "real"
    src.mkdir()
    for name in ("cockatoo.mp4", "bikes.mp4"):
        shutil.copy(real_clip(name), src / name)
    man = S.write_shards(src, tmp_path / "out", short_side=112, max_shard_size="1MB")
    assert man["num_samples"] == 2 and not man["skipped"]
    metas = {json.loads(s["json"])["source"]: json.loads(s["json"]) for s in read_all(tmp_path / "out").values()}
    for name, (src_fps, w) in {"cockatoo.mp4": (20, 200), "bikes.mp4": (25, 264)}.items():
        m = metas[name]
        assert m["source_info"]["fps"] == pytest.approx(src_fps, rel=0.01)
        assert (m["width"], m["height"]) == (w, 112)
        assert m["num_frames"] == pytest.approx(m["source_info"]["duration"] * 15, abs=1)
        assert m["motion"]["scale"] > 0 and max(m["tmotion"]) > 0


def test_cli_shards_and_inspect(src, tmp_path, capsys):
    import cv2

    from mohico.launcher.cli import main

    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(src / "obj.mp4", small / "obj.mp4")
    (small / "empty.mp4").write_bytes(b"")
    out = small / "shards"     # inside SRC: never taken as input
    args = ["shards", str(small), str(out), "--quiet", "--workers", "1", "--short-side", "96",
            "--max-shard-size", "5MB", "--min-frames", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1 videos" in text and "skipped 1 of 2" in text and "zero-byte" in text
    assert main(args) == 0 and "skipped 1 of 2" in capsys.readouterr().out    # complete: left as is
    png = tmp_path / "sample.png"
    assert main(["inspect", str(out / "shard-000000.tar"), "--key", S.sample_key("obj.mp4"), "--out", str(png)]) == 0
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 300 and img.std() > 10
    assert main(["inspect", str(out / "shard-000000.tar"), "--key", "nope", "--out", str(png)]) == 1
    assert main(["shards", str(small), str(out), "--max-shard-size", "lots"]) == 2
    assert main(["shards", str(tmp_path / "missing"), str(out)]) == 2


def test_inspect_overlays_hook(written):
    from mohico.datasets.inspect.inspect_sample import render_sample

    out, man = written
    shard = out / man["shards"][0]["name"]
    plain = render_sample(shard)
    boxed = render_sample(shard, overlays=[{"frames": list(range(0, 16, 2)), "box": (10, 10, 40, 40), "label": "query",
                                            "color": (0, 255, 0)}])
    assert boxed.shape[0] == plain.shape[0] and (boxed == [0, 255, 0]).all(axis=-1).sum() > 100


def test_synthetic_ground_truth(synth_videos, synth_shards):
    """Shards of the synthetic videos against their ground truth: sizes, frame counts, cuts, and
    where the motion is (object boxes vs camera-only shots)."""
    man = json.loads((synth_shards / "manifest.json").read_text())
    assert man["complete"] and man["num_samples"] == 6 and not man["skipped"] and man["num_shards"] >= 2
    samples = read_all(synth_shards)
    hits, gt_cuts, found, pan_only, moving = [], 0, 0, [], []
    for gt_path in sorted(synth_videos.glob("video_*.json")):
        gt = json.loads(gt_path.read_text())
        s = samples[S.sample_key(gt["file"])]
        meta = json.loads(s["json"])
        maps = np.load(io.BytesIO(s["motion.npy"])).astype(np.float64) / 255 * meta["motion"]["scale"]
        assert meta["num_frames"] == gt["num_frames"] and meta["fps"] == gt["fps"] == 15
        sc = meta["height"] / gt["height"]
        assert (meta["width"], meta["height"]) == (round(gt["width"] * sc / 2) * 2, 112)
        assert set(meta["cuts"]) <= set(gt["cuts"]), (gt["file"], meta["cuts"], gt["cuts"])
        gt_cuts += len(gt["cuts"])
        found += len(meta["cuts"])
        for shot in gt["shots"]:
            frames = range(shot["start"] + 1, shot["end"] - 1)    # away from the cuts
            inner = maps[list(frames)][:, 2:-2, 2:-2].mean()
            if not shot["objects"] and not shot["static"]:
                pan_only.append(inner)
            if shot["objects"] and shot["motion_level"] >= 2:
                moving.append(inner)
            if not shot["objects"] or shot["static"]:
                continue
            for f in frames:
                i, j = np.unravel_index(maps[f].argmax(), maps[f].shape)
                hits.append(any(int(x * sc) // 8 - 1 <= j <= int((x + w) * sc) // 8 + 1 and
                                int(y * sc) // 8 - 1 <= i <= int((y + h) * sc) // 8 + 1
                                for _, x, y, w, h in gt["boxes"][f] + gt["boxes"][f + 1]))
    assert found >= 0.75 * gt_cuts, (found, gt_cuts)
    assert np.mean(hits) >= 0.85, np.mean(hits)                 # motion peaks on a moving object
    if pan_only and moving:                                      # camera pans cancel
        assert np.mean(pan_only) < 0.5 * np.mean(moving), (pan_only, moving)


def test_h264_option(src, tmp_path):
    import av

    lst = tmp_path / "one.txt"
    lst.write_text(str(src / "pan.webm") + "\n")
    man = S.write_shards(lst, tmp_path / "out", codec="h264", gop=8, short_side=112)
    sample = next(iter(read_all(tmp_path / "out").values()))
    meta = json.loads(sample["json"])
    assert man["num_samples"] == 1 and meta["codec"] == "h264" and "mp4" in sample
    with av.open(io.BytesIO(sample["mp4"])) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "h264"
        kinds = [(p.is_keyframe, p.pts) for p in c.demux(st) if p.size]
    keyframes = [i for i, (k, _) in enumerate(kinds) if k]
    assert len(kinds) == meta["num_frames"] and keyframes[0] == 0 and max(np.diff(keyframes + [len(kinds)])) <= 8
    pts = [p for _, p in kinds]
    assert pts == sorted(pts)                                   # no B-frames: decode order == display order


def test_hard_kill_then_resume_equals_uninterrupted(src, written, tmp_path):
    """SIGKILL the writer process mid-shard (a .tar.tmp open), resume, compare byte for byte."""
    import os
    import signal
    import time

    ref_out, ref = written
    out, marker = tmp_path / "out", tmp_path / "marker"
    script = f"""
import time, mohico.datasets.write.shards as S
real = S.make_sample
def slow(task):
    r = real(task)
    if task["source"] == "vfr.mkv":          # the last input: earlier shards are closed by now
        open({str(marker)!r}, "w").close()
        time.sleep(120)
    return r
S.make_sample = slow
S.write_shards({str(src)!r}, {str(out)!r}, short_side=112, max_shard_size=120_000, labels={{"pan.webm": "panning", "obj.mp4": 3}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "writer ended before the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and partial["shards"]
    assert list(out.glob("*.tar.tmp")), "the kill should leave a partial shard"
    man = S.write_shards(src, out, short_side=112, max_shard_size=120_000, labels={"pan.webm": "panning", "obj.mp4": 3})
    assert man == ref
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_out.iterdir())
    for p in ref_out.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
