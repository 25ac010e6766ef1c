"""Several samples per video read (data.samples_per_read) and the loader's I/O accounting:
the stream on small in-memory tars, the loader on the synthetic shards, the trainer's I/O meter."""
from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.datasets.load import sampling as S
from mohico.datasets.load.pipeline import build_loader
from mohico.datasets.load.pipeline_stream import SampleStream, iter_shard
from mohico.datasets.load.pipeline_worker import draws_per_read
from mohico.trainer.io_meter import IOMeter
from test_pipeline import _same, _take, small_cfg


def _fake_shards(folder: Path, shards: int = 3, per_shard: int = 8) -> list[str]:
    """Tars of ``{key}.bin`` samples with a few KB of bytes each (the stream never parses them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, urls = np.random.default_rng(0), []
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                data = rng.bytes(int(rng.integers(1000, 5000)))
                ti = tarfile.TarInfo(f"k{s:02d}{i:03d}.bin")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        urls.append(str(path))
    return urls


def _epoch(stream: SampleStream, batch: int, avoid: bool = True) -> list[list[dict]]:
    """One finite epoch in batches, built like the worker does (avoid the batch's videos)."""
    out = []
    while True:
        got, refs = [], set()
        while len(got) < batch:
            s = stream.next(refs if avoid else ())
            if s is None:
                return out + ([got] if got else [])
            refs.add(s["__ref__"])
            got.append(s)
        out.append(got)


def test_each_read_yields_r_draws_and_reads_the_bytes_once(tmp_path):
    urls = _fake_shards(tmp_path)
    payload = sum(len(s["bin"]) for u in urls for s in iter_shard(u))
    files = sum(Path(u).stat().st_size for u in urls)
    one = SampleStream(urls, 0, 0, 1, shuffle_buffer=4, resampled=False)
    three = SampleStream(urls, 0, 0, 1, shuffle_buffer=4, resampled=False, draws=lambda s: 3)
    seen1 = [s for b in _epoch(one, 1) for s in b]
    seen3 = [s for b in _epoch(three, 1) for s in b]
    keys = sorted(s["__key__"] for s in seen1)
    assert len(keys) == 24 and len(set(keys)) == 24
    assert sorted((s["__key__"], s["__draw__"]) for s in seen3) == [(k, r) for k in keys for r in range(3)]
    for s in seen3:                       # every draw carries the same bytes as the read
        assert len(s["bin"]) > 0 and s["__ref__"][0] == 0
    # the bytes read: every tar once (payload <= counted <= file size), the same for R = 1 and 3
    assert payload <= one.bytes_read <= files and three.bytes_read == one.bytes_read


def test_draws_of_one_video_stay_out_of_a_batch_within_the_bound(tmp_path):
    urls = _fake_shards(tmp_path, shards=2, per_shard=20)
    B, R = 4, 3
    bound = (B - 1) * (R - 1) + 1
    dup = lambda b: len({s["__ref__"] for s in b}) < len(b)      # noqa: E731
    batches = _epoch(SampleStream(urls, 5, 0, 1, bound, False, draws=lambda s: R), B)
    assert sum(len(b) for b in batches) == 40 * R
    full = [b for b in batches[:-(bound // B + 1)]]             # the draining tail may repeat a video
    assert len(full) >= 20 and not any(dup(b) for b in full)
    # without `avoid` the same stream does put a video twice into a batch (the test can fail)
    plain = _epoch(SampleStream(urls, 5, 0, 1, bound, False, draws=lambda s: R), B, avoid=False)
    assert any(dup(b) for b in plain)


def test_one_draw_per_read_keeps_the_old_order(tmp_path):
    """R = 1: `avoid` never changes a pick, so streams (and runs) are what they were."""
    urls = _fake_shards(tmp_path)
    a = [s["__key__"] for b in _epoch(SampleStream(urls, 3, 0, 1, 5, False), 4, avoid=True) for s in b]
    b = [s["__key__"] for b in _epoch(SampleStream(urls, 3, 0, 1, 5, False), 4, avoid=False) for s in b]
    assert a == b


def test_stream_resume_with_draws_and_old_three_field_refs(tmp_path):
    urls = _fake_shards(tmp_path)
    full = SampleStream(urls, 1, 0, 1, 6, True, draws=lambda s: 2)
    for _ in range(7):
        full.next()
    state = copy.deepcopy(full.state_dict())
    assert all(len(r) == 4 for r in state["buffer"]) and {r[3] for r in state["buffer"]} <= {0, 1}
    rest = [(s["__key__"], s["__draw__"]) for s in (full.next() for _ in range(30))]
    again = SampleStream(urls, 1, 0, 1, 6, True, draws=lambda s: 2)
    again.load_state_dict(state)
    assert [(s["__key__"], s["__draw__"]) for s in (again.next() for _ in range(30))] == rest
    # a state written before draws existed (3-field refs) loads as draw 0
    old = SampleStream(urls, 1, 0, 1, 6, True)
    for _ in range(5):
        old.next()
    st = old.state_dict()
    st["buffer"] = [r[:3] for r in st["buffer"]]
    new = SampleStream(urls, 1, 0, 1, 6, True)
    new.load_state_dict(st)
    assert [s["__key__"] for s in (new.next() for _ in range(10))] == [s["__key__"] for s in (old.next() for _ in range(10))]


def test_default_rule_reads_each_short_video_once_and_long_ones_up_to_8_times():
    from mohico.config import DataConfig

    d = DataConfig()
    def sample(seconds):
        return {"json": json.dumps({"num_frames": int(seconds * 15), "fps": 15.0}).encode()}
    assert [draws_per_read(sample(t), d.samples_per_read, d.seconds_per_sample) for t in (8, 60, 90, 600, 7200)] \
        == [1, 1, 2, 8, 8]


def test_draws_per_read_from_the_duration():
    def sample(frames, fps=15.0):
        return {"json": json.dumps({"num_frames": frames, "fps": fps}).encode()}

    assert draws_per_read(sample(900), 4, 0.0) == 4                 # fixed R
    assert draws_per_read(sample(900), 1, 60.0) == 1
    assert draws_per_read(sample(900), 8, 60.0) == 1                # 60 s at 60 s per sample
    assert draws_per_read(sample(901), 8, 60.0) == 2
    assert draws_per_read(sample(9000), 8, 60.0) == 8               # 10 min: capped at R
    assert draws_per_read(sample(2700), 8, 60.0) == 3
    assert draws_per_read({"json": b"{bad"}, 8, 60.0) == 1         # skipped once, not R times
    assert draws_per_read(sample(900, fps=0.0), 8, 60.0) == 1


def test_loader_draws_are_independent_and_from_seed_epoch_rank_key_r(synth_shards):
    """Every sample the loader hands out equals ClipSampler's draw with sample_rng(..., r) for
    some r < R, and each video's R draws differ."""
    R = 3
    cfg = small_cfg(samples_per_read=R, seconds_per_sample=0.0, shuffle_buffer=4, resampled=False)
    loader = build_loader(cfg, str(synth_shards))
    got = [(k, f, bx) for b in loader for k, f, bx in zip(b.key, b.frames, b.boxes)]
    raw = {s["__key__"]: s for t in sorted(synth_shards.glob("*.tar")) for s in iter_shard(str(t))}
    sampler = S.ClipSampler(cfg.sampling, cfg.data, True, True)
    want = {}
    for key, s in raw.items():
        motion = np.load(io.BytesIO(s["motion.npy"]))
        for r in range(R):
            d = sampler.sample(json.loads(s["json"]), motion, S.sample_rng(cfg.trainer.seed, 0, 0, key, r), 0.0)
            want[(key, r)] = (d.frames, d.boxes)
    # 6 videos x 3 draws = 18 samples = 9 batches of 2: the finite epoch hands all of them out
    assert len(got) == len(raw) * R
    matched = set()
    for key, frames, boxes in got:
        r = next(r for r in range(R) if (key, r) not in matched and np.array_equal(want[(key, r)][0], frames.numpy())
                 and np.allclose(want[(key, r)][1], boxes.numpy()))
        matched.add((key, r))
    for key in raw:
        assert len({want[(key, r)][0].tobytes() for r in range(R)}) == R      # independent draws
    assert loader.stats()["bytes_read"] > 0


@pytest.mark.slow
def test_loader_resume_is_bitwise_with_several_draws(synth_shards):
    cfg = small_cfg(num_workers=2, samples_per_read=3, seconds_per_sample=0.0)
    full = build_loader(cfg, str(synth_shards))
    _take(full, 3)
    state = copy.deepcopy(full.state_dict())
    rest = _take(full, 5)
    full.close()
    resumed = build_loader(cfg, str(synth_shards))
    resumed.load_state_dict(state)
    for x, y in zip(rest, _take(resumed, 5)):
        _same(x, y)
    resumed.close()
    assert any(len(s["buffer"]) > 0 for s in state["streams"].values())


def test_io_meter_window_rates():
    m = IOMeter(1, {"bytes_read": 1000})
    w = m.window({"bytes_read": 7000}, clips=12, seconds=2.0)
    assert w == {"window_bytes_read": 6000.0, "rank1_bytes_per_clip": 500.0, "rank1_read_bytes_per_s": 3000.0}
    w = m.window({"bytes_read": 7000}, clips=12, seconds=2.0)
    assert w["window_bytes_read"] == 0 and w["rank1_bytes_per_clip"] == 0
    t = IOMeter.totals({"data/window_bytes_read": 12000.0}, clips=24, seconds=4.0)
    assert t == {"io/bytes_per_clip": 500.0, "io/read_MB_per_s": 0.003}
