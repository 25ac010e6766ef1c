"""`mohico inspect` with the training sampler: the drawn views equal what the loader hands the
trainer for the same sample, and the picture shows them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mohico.config import load_config
from mohico.datasets.inspect.inspect_overlays import COLORS, draw_sample, overlays_for
from mohico.datasets.inspect.inspect_sample import HEADER, TILE_H, read_sample
from mohico.launcher.cli import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SETS = ["data.clip_len=8", "data.frame_stride=2", "data.crop_size=32", "data.motion_size=7",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=3", "trainer.seed=7"]


def shard_of(shards: Path) -> dict:
    man = json.loads((shards / "manifest.json").read_text())
    return {k: shards / s["name"] for s in man["shards"] for k in s["samples"]}


def test_overlays_equal_the_loaders_draw(synth_shards):
    """The strongest independent check: the loader's batches (frames, pixel boxes, flip, crop
    method) for each key equal the overlays inspect builds for the same seed/epoch/rank/progress."""
    from mohico.datasets.load.pipeline import build_loader

    cfg = load_config(TINY, SETS)
    where = shard_of(synth_shards)
    loader = build_loader(cfg, str(synth_shards))
    loader.set_progress(0.6)
    checked = 0
    for _, batch in zip(range(2), loader):
        for i, key in enumerate(batch.key):
            d = draw_sample(cfg, where[key], read_sample(where[key], key), progress=0.6, epoch=0, rank=0)
            ovs = overlays_for(d)
            assert len(ovs) == batch.frames.shape[1] == 3
            for v, ov in enumerate(ovs):
                np.testing.assert_array_equal(ov["frames"], batch.frames[i, v].numpy())
                np.testing.assert_array_equal(ov["box"], batch.boxes[i, v].numpy())
                assert ov["flip"] == bool(batch.flip[i, v])
                assert (ov["crop"] == "motion") == bool(batch.crop_motion[i, v])
            assert float(batch.progress[i]) == pytest.approx(d.progress)
            checked += 1
    loader.close()
    assert checked == 4
    # another rank, epoch or progress is another draw (the rng really depends on them)
    key = batch.key[0]
    s = read_sample(where[key], key)
    base = draw_sample(cfg, where[key], s, progress=0.6)
    for other in (draw_sample(cfg, where[key], s, progress=0.6, rank=1),
                  draw_sample(cfg, where[key], s, progress=0.6, epoch=1)):
        assert not (np.array_equal(other.draw.frames, base.draw.frames)
                    and np.array_equal(other.draw.boxes, base.draw.boxes))


def test_cli_picture_shows_the_boxes(synth_shards, tmp_path, capsys):
    import cv2

    where = shard_of(synth_shards)
    key = min(where)
    out = tmp_path / "pics" / "s.png"
    args = ["inspect", str(where[key]), "--key", key, "--config", str(TINY), "--progress", "0.6",
            "--out", str(out), "--set", *SETS]
    assert main(args) == 0
    assert "crop" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["s.png"]         # atomic: no temp file left
    img = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    cfg = load_config(TINY, SETS)
    s = read_sample(where[key], key)
    ovs = overlays_for(draw_sample(cfg, where[key], s, progress=0.6))
    # the tiles are in time order (first, middle, last frame of every view, sorted); view 0's first
    # frame's tile shows view 0's box: its top edge has view 0's colour
    shown = sorted({f for ov in ovs for f in (ov["frames"][0], ov["frames"][len(ov["frames"]) // 2], ov["frames"][-1])})
    x, y, w, _h = ovs[0]["box"]
    f0 = ovs[0]["frames"][0]
    later = [ov for ov in ovs[1:] if f0 in ov["frames"]]            # drawn over view 0's box
    sc = TILE_H / s["meta"]["height"]
    tw = round(s["meta"]["width"] * sc)
    row = HEADER + int(y * sc)
    x0 = shown.index(f0) * tw
    edge = img[row, x0 + int(x * sc) + 2:x0 + min(int((x + w) * sc) - 2, tw)]
    colours = {tuple(COLORS[0])} | {tuple(ov["color"]) for ov in later}
    hits = sum(tuple(int(c) for c in p) in colours for p in edge)
    assert hits >= 0.8 * len(edge) and len(edge) > 10
    if not later:
        assert (edge == COLORS[0]).all(axis=-1).mean() > 0.8
    # a second run replaces the picture in place
    assert main(args + ["--epoch", "1"]) == 0 and [p.name for p in out.parent.iterdir()] == ["s.png"]


def test_cli_errors(synth_shards, tmp_path, capsys):
    shard = min(synth_shards.glob("*.tar"))
    png = str(tmp_path / "x.png")
    assert main(["inspect", str(shard), "--key", "nope", "--out", png]) == 1
    err = capsys.readouterr().err
    some = json.loads((synth_shards / "manifest.json").read_text())["shards"][0]["samples"][0]
    assert str(shard) in err and "'nope'" in err and some in err
    assert main(["inspect", str(shard), "--progress", "0.5", "--out", png]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["inspect", str(shard), "--config", str(TINY), "--progress", "2", "--out", png]) == 2
    assert not Path(png).exists()


def test_config_picture_frames_in_time_order_and_labelled_curve(synth_shards, tmp_path):
    """The frame tiles' captions (f<index> <seconds>) run in time order across views, and the
    T-motion curve's axes carry labels."""
    from mohico.datasets.inspect.inspect_sample import CURVE_H, render_sample

    where = shard_of(synth_shards)
    key = min(where)
    cfg = load_config(TINY, SETS)
    s = read_sample(where[key], key)
    ovs = overlays_for(draw_sample(cfg, where[key], s, progress=0.9))
    calls = []
    import mohico.datasets.inspect.inspect_sample as ins
    real = ins._text

    def spy(img, text, org, *a, **k):
        calls.append((text, org))
        return real(img, text, org, *a, **k)

    ins._text = spy
    try:
        render_sample(where[key], overlays=ovs, sample=s)
    finally:
        ins._text = real
    tiles = [int(t.split()[0][1:]) for t, _ in calls if t.startswith("f") and t.endswith("s") and " " in t]
    assert tiles == sorted(tiles) and len(tiles) >= 3
    assert set(tiles) == {f for ov in ovs for f in (ov["frames"][0], ov["frames"][len(ov["frames"]) // 2],
                                                    ov["frames"][-1])}
    texts = [t for t, _ in calls]
    assert any(t.startswith("T-motion") for t in texts) and "0s" in texts and any("time in the video" in t for t in texts)
    assert CURVE_H > 40


def _garbage_shard(path: Path, video: bytes, meta: bytes, motion: bytes) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for ext, data in (("webm", video), ("json", meta), ("motion.npy", motion)):
            info = tarfile.TarInfo(f"abc123.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _npy(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


GOOD_META = json.dumps({"fps": 15, "num_frames": 10, "width": 64, "height": 48}).encode()
GOOD_MOTION = _npy(np.zeros((10, 4, 5), np.uint8))


@pytest.mark.parametrize("video, meta, motion, member", [
    (b"\x1aE\xdf\xa3 this is not a video" * 20, GOOD_META, GOOD_MOTION, "abc123.webm"),
    (b"\x00" * 4096, GOOD_META, GOOD_MOTION, "abc123.webm"),
    (b"whatever", b"{not json", GOOD_MOTION, "abc123.json"),
    (b"whatever", GOOD_META, b"\x93NUMPY garbage", "abc123.motion.npy"),
])
def test_cli_garbage_sample_is_a_clear_error(tmp_path, capsys, video, meta, motion, member):
    shard = _garbage_shard(tmp_path / "shard-000000.tar", video, meta, motion)
    png = tmp_path / "x.png"
    assert main(["inspect", str(shard), "--out", str(png)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("mohico inspect: error:")
    assert str(shard) in err and member in err and "mohico shards" in err
    assert not png.exists()


def test_cli_a_video_file_instead_of_a_shard_is_a_clear_error(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    assert main(["inspect", str(video), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(video) in err and "not a tar" in err
