"""The data pipeline on synthetic shards: remux, DALI vs PyAV, batches, resume, bad data,
and the motion-focused sampling against the synthetic videos' ground truth."""
from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.config import Config
from mohico.datasets.load import sampling as S
from mohico.datasets.load.batch import ClipBatch
from mohico.datasets.load.pipeline import build_loader
from mohico.datasets.load.pipeline_cpu import transform_clip
from mohico.datasets.load.pipeline_stream import iter_shard
from mohico.datasets.load.remux import ClipRemuxer, decode_frames

NO_AUG = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "grayscale": False,
          "blur_sigma": 0.0, "flip": False}


def small_cfg(**data) -> Config:
    cfg = Config()
    cfg.objectives.mcl.weight = 1.0
    cfg.objectives.hico.weight = 1.0
    d = cfg.data
    d.batch_size, d.num_workers, d.clip_len, d.frame_stride = 2, 0, 8, 2
    d.crop_size, d.motion_size, d.shuffle_buffer = 48, 7, 3
    for k, v in data.items():
        setattr(d, k, v)
    return cfg


def samples(shards: Path) -> list[dict]:
    out = []
    for tar in sorted(shards.glob("*.tar")):
        out.extend(iter_shard(str(tar)))
    return out


def gt_for(sample: dict, synth_videos: Path) -> dict:
    meta = json.loads(sample["json"])
    return json.loads((synth_videos / Path(meta["source"]).with_suffix(".json").name).read_text())


# --------------------------------------------------------------------------- remux + decoders
def test_remux_gives_the_same_frames_as_a_full_decode(synth_shards):
    s = samples(synth_shards)[0]
    meta = json.loads(s["json"])
    full = decode_frames(s["webm"], np.arange(meta["num_frames"]))
    with ClipRemuxer(s["webm"], meta["fps"]) as rem:
        for first, last in [(0, 14), (37, 51), (70, meta["num_frames"] - 1)]:
            cut = rem.cut(first, last)
            assert cut.key_frame <= first and cut.key_frame % 16 == 0           # GOP 16
            assert len(cut.data) < len(s["webm"])
            want = np.arange(first, last + 1, 2)
            got = decode_frames(cut.data, want - cut.key_frame)
            np.testing.assert_array_equal(got, full[want])


@pytest.mark.parametrize("aug", [NO_AUG, {"brightness": 1.2, "contrast": 0.8, "saturation": 0.6, "hue": 20.0,
                                          "grayscale": False, "blur_sigma": 1.1, "flip": True},
                                 {**NO_AUG, "grayscale": True, "flip": True}])
def test_dali_cpu_equals_pyav_path(synth_shards, aug):
    from mohico.datasets.load.dali_decode import DaliClipDecoder

    s = samples(synth_shards)[1]
    meta = json.loads(s["json"])
    mean, std = [0.45] * 3, [0.225] * 3
    with ClipRemuxer(s["webm"], meta["fps"]) as rem:
        cut = rem.cut(40, 54)
    rel = (np.arange(40, 55, 2) - cut.key_frame).astype(np.int32)
    box = (17, 9, 90, 80)
    dali = DaliClipDecoder(2, 64, mean, std).decode([{"data": cut.data, "frames": rel, "box": box, "aug": aug}])[0]
    ref = transform_clip(decode_frames(cut.data, rel), box, aug, 64, mean, std)
    diff = np.abs(dali.numpy() - ref) * 0.225 * 255          # in 8-bit levels
    assert dali.shape == (3, 8, 64, 64)
    # decoder colour conversion and resampling differ by a few levels on average
    assert diff.mean() < 3.0, diff.mean()
    assert np.percentile(diff, 99) < 25, np.percentile(diff, 99)


# --------------------------------------------------------------------------- batches
def test_batch_contract_and_motion_targets(synth_shards):
    cfg = small_cfg()
    loader = build_loader(cfg, str(synth_shards))
    by_key = {x["__key__"]: x for x in samples(synth_shards)}
    for _, b in zip(range(3), loader):
        B, V, T = 2, 3, 8
        assert isinstance(b, ClipBatch) and b.size == B
        assert b.clips.shape == (B, V, 3, T, 48, 48) and b.clips.dtype == torch.float32
        assert b.motion.shape == (B, V, T, 7, 7) and b.frames.shape == (B, V, T)
        assert b.video_id.dtype == torch.int64 and len(b.key) == B
        for i, key in enumerate(b.key):
            meta = json.loads(by_key[key]["json"])
            motion = np.load(io.BytesIO(by_key[key]["motion.npy"])).astype(np.float32) * meta["motion"]["scale"] / 255
            fr = b.frames[i].numpy()
            assert fr.min() >= 0 and fr.max() < meta["num_frames"]
            st = fr[:, 0] / 15.0
            assert abs(st[0] - st[1]) < S.gradual_delta(0.0, 1.0) or st[0] == st[1]   # progress 0
            for v in range(V):
                x, y, w, h = b.boxes[i, v].tolist()
                assert 0 <= x and 0 <= y and x + w <= meta["width"] and y + h <= meta["height"]
                stride = meta["motion"]["stride"]
                ref = S.crop_resize_maps(motion[fr[v]], (x / stride, y / stride, w / stride, h / stride),
                                         (7, 7), bool(b.flip[i, v]))
                np.testing.assert_allclose(b.motion[i, v].numpy(), ref, atol=1e-5)
    assert loader.stats()["skipped"] == 0


def test_flip_mirrors_frames_and_motion_together(synth_shards):
    outs = []
    for p in (0.0, 1.0):
        cfg = small_cfg()
        a = cfg.data.augment
        a.color_jitter_prob, a.grayscale_prob, a.blur_prob, a.flip_prob = 0.0, 0.0, 0.0, p
        outs.append(next(iter(build_loader(cfg, str(synth_shards)))))
    plain, flipped = outs
    assert plain.key == flipped.key and torch.equal(plain.frames, flipped.frames)
    assert bool(flipped.flip.all()) and not bool(plain.flip.any())
    torch.testing.assert_close(flipped.clips, plain.clips.flip(-1), atol=2e-5, rtol=0)
    torch.testing.assert_close(flipped.motion, plain.motion.flip(-1))


def test_pyav_decoder_matches_dali_in_the_loader(synth_shards):
    a = next(iter(build_loader(small_cfg(decoder="dali"), str(synth_shards))))
    b = next(iter(build_loader(small_cfg(decoder="pyav"), str(synth_shards))))
    assert a.key == b.key and torch.equal(a.frames, b.frames) and torch.equal(a.boxes, b.boxes)
    diff = (a.clips - b.clips).abs() * 0.225 * 255
    assert diff.mean() < 3.0


def _take(loader, n, progress=None):
    out = []
    for i in range(n):
        if progress is not None:
            loader.set_progress(progress(i))
        out.append(next(loader))
    return out


def _same(a, b):
    assert a.key == b.key
    for k in ("clips", "motion", "frames", "boxes", "progress", "video_id", "flip", "crop_motion"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_round_trip_gives_identical_batches(synth_shards, workers):
    cfg = small_cfg(num_workers=workers)
    prog = lambda i: min(1.0, 0.2 * i)                        # noqa: E731 - the trainer's schedule
    full = build_loader(cfg, str(synth_shards))
    _take(full, 2, prog)                                      # uninterrupted run ...
    state = copy.deepcopy(full.state_dict())                  # ... checkpointed mid-epoch
    rest = []
    for i in range(2, 7):
        full.set_progress(prog(i))
        rest.append(next(full))
    full.close()
    resumed = build_loader(cfg, str(synth_shards))
    resumed.load_state_dict(state)
    again = []
    for i in range(2, 7):
        resumed.set_progress(prog(i))
        again.append(next(resumed))
    for x, y in zip(rest, again):
        _same(x, y)
    assert state["streams"] and any(s["buffer"] for s in state["streams"].values())  # buffer restored
    assert float(rest[-1].progress[0]) > 0                 # the progress schedule was exercised


def test_resume_at_another_world_size(synth_shards):
    cfg = small_cfg()
    one = build_loader(cfg, str(synth_shards))
    _take(one, 4)
    state = one.state_dict()
    epoch = min(s["epoch"] for s in state["streams"].values())
    keys = set()
    for rank in range(2):
        two = build_loader(cfg, str(synth_shards), rank=rank, world_size=2)
        two.load_state_dict(state)
        for b in _take(two, 2):
            keys.update(b.key)
        assert all(s["epoch"] >= epoch for s in two.state_dict()["streams"].values())
    assert len(keys) >= 2


# --------------------------------------------------------------------------- bad data
def _member(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(synth_shards, tmp_path):
    good = samples(synth_shards)
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, s in enumerate(good[:4]):
            key = s["__key__"]
            video, meta, motion = s["webm"], s["json"], s["motion.npy"]
            if i == 1:
                video = b"\x1aE\xdf\xa3" + bytes(range(256)) * 40            # bad bytes
            _member(tar, f"{key}.webm", video)
            if i == 2:
                _member(tar, f"{key}.json", b"{not json")                      # corrupt member
            else:
                _member(tar, f"{key}.json", meta)
            if i != 3:                                                          # missing motion
                _member(tar, f"{key}.motion.npy", motion)
        odd = dict(json.loads(good[0]["json"]), tmotion="oops")                 # fails in the sampler
        _member(tar, "odd.webm", good[0]["webm"])
        _member(tar, "odd.json", json.dumps(odd).encode())
        _member(tar, "odd.motion.npy", good[0]["motion.npy"])
        for s in good[4:]:
            for ext in ("webm", "json", "motion.npy"):
                _member(tar, f"{s['__key__']}.{ext}", s[ext])
    raw = path.read_bytes()
    trunc = tmp_path / "bad-000001.tar"
    trunc.write_bytes(raw[: len(raw) // 3])                                    # truncated tar
    cfg = small_cfg(resampled=False, batch_size=1)
    loader = build_loader(cfg, [str(path), str(trunc)])
    batches = list(loader)
    st = loader.stats()
    assert st["bad_video"] >= 1 and st["bad_json"] >= 1 and st["missing_motion"] >= 1
    assert st["read_error"] >= 1 and st["bad_other"] == 1
    assert st["skipped"] == st["bad_video"] + st["bad_json"] + st["missing_motion"] + st["bad_other"]
    assert all(b.clips.shape[0] == 1 for b in batches)
    keys = {k for b in batches for k in b.key}
    assert keys.isdisjoint({good[1]["__key__"], good[2]["__key__"], good[3]["__key__"], "odd"})
    assert good[0]["__key__"] in keys and len(batches) >= 3


# --------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("draw, ratio", [("pool", 0.6), ("halves", 0.9)])
def test_motion_focused_sampling_prefers_moving_shots(synth_shards, synth_videos, draw, ratio):
    """Focused draws land in static shots far less often than uniform ones of the same rule. The
    official halves rule focuses less (each half must give a clip, a wholly static half too, and it
    keeps the top half + 1 of each half's clips by rank) than the median over the whole video."""
    cfg = small_cfg()
    cfg.objectives.hico.weight = 0.0
    cfg.sampling.mcl_temporal = draw
    mcl = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False)
    cfg_u = copy.deepcopy(cfg)
    cfg_u.sampling.motion_prob = 0.0
    uni = S.ClipSampler(cfg_u.sampling, cfg_u.data, mcl=True, hico=False)
    static = {"mcl": [], "uniform": []}
    used = 0
    for s in samples(synth_shards):
        gt = gt_for(s, synth_videos)
        if not any(sh["static"] for sh in gt["shots"]):
            continue
        used += 1
        meta = json.loads(s["json"])
        is_static = np.zeros(meta["num_frames"], bool)
        for sh in gt["shots"]:
            is_static[sh["start"]:sh["end"]] = sh["static"]
        for name, smp in (("mcl", mcl), ("uniform", uni)):
            for i in range(300):
                st, _, _ = smp.temporal(meta, S.sample_rng(0, i, 0, s["__key__"]))
                fr = np.stack([S.clip_frames(x, 8, 2, meta["num_frames"]) for x in st])
                static[name].append(is_static[fr].mean())
    assert used >= 1
    mcl_static, uni_static = np.mean(static["mcl"]), np.mean(static["uniform"])
    assert mcl_static < ratio * uni_static, (mcl_static, uni_static)


def _iou(a, b):
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def _inside(box, gt):
    """Fraction of ``gt``'s area inside ``box``."""
    iw = max(0.0, min(box[0] + box[2], gt[0] + gt[2]) - max(box[0], gt[0]))
    ih = max(0.0, min(box[1] + box[3], gt[1] + gt[3]) - max(box[1], gt[1]))
    return iw * ih / (gt[2] * gt[3])


@pytest.mark.parametrize("rule", ["percentile", "official"])
def test_motion_crop_box_covers_the_moving_object(synth_shards, synth_videos, rule):
    from mohico.datasets.load.crops import official_crop_box

    crop = official_crop_box if rule == "official" else (lambda m, rng: S.motion_crop_box(m, rng=rng))
    ious = {"motion": [], "random": []}
    inside = {"motion": [], "random": []}
    rng = np.random.default_rng(0)
    for s in samples(synth_shards):
        gt = gt_for(s, synth_videos)
        meta = json.loads(s["json"])
        motion = np.load(io.BytesIO(s["motion.npy"])).astype(np.float32)
        sx, sy = meta["width"] / gt["width"], meta["height"] / gt["height"]
        stride = meta["motion"]["stride"]
        for sh in gt["shots"]:
            # one object, no camera pan: the ground-truth box is that object's extent over the clip
            if sh["static"] or sh["pan"] != [0.0, 0.0] or len(sh["objects"]) != 1 or sh["end"] - sh["start"] < 20:
                continue
            f0 = sh["start"] + 2
            frames = np.arange(f0, f0 + 15, 2)
            boxes = np.array([gt["boxes"][f][0][1:] for f in frames])
            x0, y0 = boxes[:, 0].min() * sx, boxes[:, 1].min() * sy
            x1, y1 = (boxes[:, 0] + boxes[:, 2]).max() * sx, (boxes[:, 1] + boxes[:, 3]).max() * sy
            gt_box = (x0, y0, x1 - x0, y1 - y0)
            for _ in range(20):
                box, method = crop(motion[frames].mean(axis=0), rng)
                if method == "motion":
                    px = [v * stride for v in box]
                    ious["motion"].append(_iou(px, gt_box))
                    inside["motion"].append(_inside(px, gt_box))
                    # the same size anywhere in the frame: the crop's scale is random (both
                    # rules), so its focus is judged against boxes of its own size
                    w, h = min(px[2], meta["width"]), min(px[3], meta["height"])
                    rb = (rng.uniform(0, meta["width"] - w), rng.uniform(0, meta["height"] - h), w, h)
                    ious["random"].append(_iou(rb, gt_box))
                    inside["random"].append(_inside(rb, gt_box))
    assert len(ious["motion"]) >= 20
    # the object is ~5% of the frame and crops hold >= 20% of the frame, so the IoU is capped
    # near 0.25: compare with random boxes of the same sizes, and check the object lies inside
    m, r = np.mean(ious["motion"]), np.mean(ious["random"])
    assert m > 1.5 * r, (m, r)
    mi, ri = np.mean(inside["motion"]), np.mean(inside["random"])
    assert mi > 0.75 and mi > ri + 0.2, (mi, ri)


def test_sampled_clips_avoid_the_synthetic_videos_shot_cuts(synth_shards, synth_videos):
    """Against the ground-truth cuts: with sampling.avoid_cuts no view spans a detected cut, and
    the views spanning any true cut (only those the shard writer missed) fall well below the
    rate without it."""
    def spans(fr, cuts):
        return any(fr[0] < c <= fr[-1] for c in cuts)

    rates = {}
    for avoid in (True, False):
        cfg = small_cfg()
        cfg.sampling.avoid_cuts = avoid
        sampler = S.ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=True)
        sampler.set_progress(1.0)
        hit = views = 0
        for s in samples(synth_shards):
            gt, meta = gt_for(s, synth_videos), json.loads(s["json"])
            assert gt["cuts"], gt["file"]
            motion = np.load(io.BytesIO(s["motion.npy"]))
            for i in range(60):
                d = sampler.sample(meta, motion, S.sample_rng(0, 0, 0, f"{s['__key__']}-{i}"))
                for fr in d.frames:
                    views += 1
                    hit += spans(fr, gt["cuts"])
                    if avoid:
                        assert not spans(fr, meta["cuts"]), (fr, meta["cuts"])
        rates[avoid] = hit / views
    assert rates[False] > 0.1 and rates[True] < 0.5 * rates[False], rates


def test_h264_shards_decode_with_pyav_on_cpu(tmp_path):
    """DALI's CPU decoder cannot read H.264: the loader decodes it with PyAV, same sampling."""
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize

    synthesize(tmp_path / "v", videos=2, seed=5, codec="h264", fps=15, size=(96, 72), duration=3.0, topics=2)
    write_shards(tmp_path / "v", tmp_path / "s", codec="h264", short_side=64, fps=15, gop=16,
                 max_shard_size=10_000_000, workers=1, flow="dis", progress=False)
    cfg = small_cfg(crop_size=28)           # 64-pixel shards: 28 px is the largest crop without upsampling
    loader = build_loader(cfg, str(tmp_path / "s"))
    b = next(loader)
    assert b.clips.shape == (2, 3, 3, 8, 28, 28) and torch.isfinite(b.clips).all()
    assert loader.stats()["skipped"] == 0 and loader.stats()["dali_fallback"] == 0
    # the same batch through PyAV explicitly is identical (the auto path chose PyAV)
    again = next(build_loader(small_cfg(decoder="pyav", crop_size=28), str(tmp_path / "s")))
    assert torch.equal(b.clips, again.clips)


_RANK_SCRIPT = """
import os, sys, time
from mohico.config import load_config
from mohico.datasets.load.pipeline import build_loader
if __name__ == "__main__":
    cfg = load_config(sys.argv[1], [f"data.shards={sys.argv[2]}", "data.num_workers=1"])
    it = iter(build_loader(cfg, sys.argv[2]))
    next(it)
    print("ready", flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
@pytest.mark.dist
def test_workers_exit_when_the_rank_is_killed(synth_shards, tmp_path):
    """A rank killed with SIGKILL leaves no loader worker or forkserver behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    rank = subprocess.Popen([sys.executable, str(script), str(root / "configs" / "tiny_cpu.yaml"), str(synth_shards)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert rank.stdout.readline().strip() == "ready"

        def descendants():
            out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
            pairs = list(zip(map(int, out[0::2]), map(int, out[1::2])))
            found, frontier = set(), {rank.pid}
            while frontier:
                frontier = {p for p, pp in pairs if pp in frontier} - found
                found |= frontier
            return found

        children = descendants()
        assert children, "the loader started no worker process"
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait(timeout=30)
        deadline = time.time() + 20
        alive = children
        while alive and time.time() < deadline:
            time.sleep(0.5)
            alive = {p for p in children if os.path.exists(f"/proc/{p}") and
                     "zombie" not in open(f"/proc/{p}/status").read().lower()}
        assert not alive, f"loader processes outlived their killed rank: {sorted(alive)}"
    finally:
        if rank.poll() is None:
            rank.kill()


@pytest.mark.parametrize("mcl,hico,views", [(1.0, 0.0, 2), (0.0, 1.0, 3), (1.0, 1.0, 3)])
def test_views_per_video_follow_the_objectives(synth_shards, mcl, hico, views):
    """V is said once (cfg.objectives.num_views): the batch, the decoder and the clip counter use it."""
    cfg = small_cfg()
    cfg.objectives.mcl.weight, cfg.objectives.hico.weight = mcl, hico
    assert cfg.objectives.num_views == views
    loader = build_loader(cfg, str(synth_shards))
    b = next(iter(loader))
    assert b.clips.shape[:2] == (2, views) and b.frames.shape[1] == views
    assert loader.stats()["clips"] == 2 * views
    loader.close()
