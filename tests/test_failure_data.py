"""Bad input never hangs the loader (issue 14, item 1): each kind x {rank 0, rank 1 of 2}
is refused at start or fails within 60 s naming the shards, the skip reasons and the fix; a
finite loader's epoch rolls over; a killed worker is named within seconds. The loader is built
per rank in-process (it needs no process group)."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from mohico.datasets.load.pipeline import build_loader
from mohico.datasets.load.pipeline_stream import iter_shard
from mohico.errors import ConfigError, MohicoError
from mohico.trainer.batches import next_batch
from tests._worker_start_window import ignored_signals
from tests.test_pipeline import _member, small_cfg


def foreign_tar(folder):
    """A tar that is not a mohico shard (text files)."""
    folder.mkdir()
    with tarfile.open(folder / "notes-000000.tar", "w") as tar:
        for i in range(5):
            _member(tar, f"doc{i}.txt", f"hello {i}".encode())
    return folder


def all_bad_shards(folder, synth_shards):
    """mohico shards whose every sample has corrupt metadata."""
    folder.mkdir()
    for src in sorted(synth_shards.glob("*.tar")):
        with tarfile.open(folder / src.name, "w") as tar:
            for s in iter_shard(str(src)):
                _member(tar, f"{s['__key__']}.webm", s["webm"])
                _member(tar, f"{s['__key__']}.json", b"{not json")
                _member(tar, f"{s['__key__']}.motion.npy", s["motion.npy"])
    return folder


def shards_without_manifest(folder, synth_shards):
    folder.mkdir()
    for src in synth_shards.glob("*.tar"):
        shutil.copy(src, folder / src.name)
    return folder


@pytest.mark.parametrize("rank, world", [(0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("kind", ["foreign_tar", "all_bad"])
def test_unusable_shards_fail_within_a_minute_naming_shards_reasons_and_fix(synth_shards, tmp_path, kind, rank, world):
    folder = foreign_tar(tmp_path / "s") if kind == "foreign_tar" else all_bad_shards(tmp_path / "s", synth_shards)
    loader = build_loader(small_cfg(), str(folder), rank=rank, world_size=world)
    t0 = time.monotonic()
    with pytest.raises(MohicoError) as e:
        next(iter(loader))
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert f"rank {rank}, loader stream" in msg and "gave no usable sample" in msg and str(folder) in msg
    assert "'bad_json': " in msg and "metadata json" in msg and "last error: " in msg and "`mohico shards`" in msg and "data.num_workers" in msg


@pytest.mark.parametrize("rank", [0, 1])
def test_too_few_samples_for_ranks_x_workers_is_refused_at_start(synth_shards, rank):
    # the synthetic set: 6 samples in 2 shards; 2 ranks x 4 workers = 8 streams
    with pytest.raises(ConfigError, match=r"6 samples in 2 shard\(s\).*2 rank\(s\) x 4 loader workers = 8 streams"):
        build_loader(small_cfg(num_workers=4), str(synth_shards), rank=rank, world_size=2)
    build_loader(small_cfg(num_workers=3), str(synth_shards), rank=rank, world_size=2)       # 6 streams: fine


def test_starved_stream_without_manifest_fails_instead_of_hanging(synth_shards, tmp_path):
    folder = shards_without_manifest(tmp_path / "s", synth_shards)
    loader = build_loader(small_cfg(), str(folder), rank=7, world_size=8)   # stream 7 of 8, 6 samples
    t0 = time.monotonic()
    with pytest.raises(MohicoError, match="rank 7, loader stream 0 of 8: a whole epoch gave this stream no sample"):
        next(iter(loader))
    assert time.monotonic() - t0 < 60


class FiniteLoader:
    """Two batches per epoch; ``empty_from`` epochs on yield nothing."""

    def __init__(self, empty_from=None):
        self.epoch, self.n, self.empty_from = 0, 0, empty_from

    def __iter__(self):
        self.n = 0
        return self

    def __next__(self):
        if self.n >= 2 or (self.empty_from is not None and self.epoch >= self.empty_from):
            self.epoch += 1
            raise StopIteration
        self.n += 1
        return (self.epoch, self.n)

    def stats(self):
        return {"skipped": 4}

    def last_error(self):
        return "x.tar:k: unreadable metadata json"


def test_finite_epoch_rolls_over_and_an_empty_epoch_is_an_error():
    loader = FiniteLoader(empty_from=2)
    data, got = iter(loader), []
    for _ in range(4):
        data, batch = next_batch(data, loader)
        got.append(batch)
    assert got == [(0, 1), (0, 2), (1, 1), (1, 2)]
    with pytest.raises(MohicoError, match=r"a whole data epoch gave no batch \(loader counters: \{'skipped': 4\}; "
                                          r"last error: x.tar:k: unreadable metadata json\)"):
        next_batch(data, loader)


def test_finite_loader_stops_cleanly_after_one_epoch(synth_shards):
    keys = []
    for rank in (0, 1):      # each rank's epoch ends (StopIteration, no traceback); together: every sample once
        loader = build_loader(small_cfg(resampled=False, batch_size=1), str(synth_shards), rank=rank, world_size=2)
        keys += [k for b in loader for k in b.key]
        assert loader.stats()["skipped"] == 0
    assert len(keys) == len(set(keys)) == 6


def test_killed_worker_is_named_within_seconds(synth_shards):
    loader = build_loader(small_cfg(num_workers=2), str(synth_shards))
    it = iter(loader)
    next(it)
    assert loader.dead_workers() == ""
    pid = loader._it._workers[0].pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while not loader.dead_workers() and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert f"pid {pid} killed by signal 9" in loader.dead_workers() and "OOM killer" in loader.dead_workers()
    loader.close()


def test_preemption_signals_to_every_process_leave_the_loader_alive(synth_shards):
    """SLURM's `--signal=USR1@N` and `scancel --signal` reach every process of the step, the
    loader's forkserver and workers included; preemption is the rank's job (save, exit 3), so
    they must outlive USR1/TERM and keep serving batches (they died: the watchdog then exit 5)."""
    loader = build_loader(small_cfg(num_workers=2), str(synth_shards))
    it = iter(loader)
    next(it)
    workers = [w.pid for w in loader._it._workers]
    forkserver = {int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) for pid in workers}
    assert os.getpid() not in forkserver      # the forkserver, not the rank, is their parent
    for pid in (*workers, *forkserver):       # so the kernel discards the signals below as it gets them
        assert {signal.SIGUSR1, signal.SIGTERM} <= ignored_signals(pid), pid
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        for pid in (*workers, *forkserver):
            os.kill(pid, sig)
    assert loader.dead_workers() == ""
    for pid in forkserver:
        os.kill(pid, 0)                        # still alive: ProcessLookupError otherwise
    for _ in range(4):
        next(it)                                 # more than the prefetched batches: workers still serve
    assert loader.dead_workers() == ""
    loader.close()


def test_preemption_signal_inside_a_workers_start_leaves_it_alive(tmp_path):
    """A preemption signal reaching a loader worker before its ``worker_init_fn`` ran (its
    dataset still unpickling) killed it when its forkserver predated the signal preload (issue
    25: "data-loader worker(s) died ... killed by signal 15"). tests/_worker_start_window.py
    starts such a forkserver, holds the worker in that window on a fifo, sends it SIGTERM and
    SIGUSR1, lets it go and takes its batch; its forkserver must ignore both signals too."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "tests._worker_start_window", str(tmp_path)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "served by " in res.stdout, (res.stdout, res.stderr[-3000:])


def test_watchdog_ends_the_process_on_a_dead_worker_and_on_a_stall():
    code = ("import time, sys; from mohico.trainer.watchdog import Watchdog; "
            "t = time.monotonic(); "
            "dog = Watchdog(float(sys.argv[1]), 0, lambda: 'loader counters X', "
            "probe=(lambda: 'worker pid 7 killed by signal 9' if time.monotonic() - t > 1 else '') "
            "if sys.argv[2] == '1' else None).start(); time.sleep(60)")
    for stall, probe, needle in (("0", "1", "worker pid 7 killed by signal 9; loader counters X"),
                                 ("2", "0", "s (trainer.stall_timeout_s=2) while waiting for the first batch; "
                                            "loader counters X")):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-c", code, stall, probe], capture_output=True, text=True, timeout=60)
        assert res.returncode == 5 and needle in res.stderr, res.stderr[-2000:]
        assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("rank", [0, 1])
def test_motion_npy_not_matching_the_json_is_skipped_and_counted(synth_shards, tmp_path, rank):
    import numpy as np

    folder = tmp_path / "s"
    folder.mkdir()
    bad_keys = set()
    for src in sorted(synth_shards.glob("*.tar")):
        with tarfile.open(folder / src.name, "w") as tar:
            for i, s in enumerate(iter_shard(str(src))):
                motion = np.load(io.BytesIO(s["motion.npy"]))
                if i == 0:      # first sample of each shard: half the frames / a coarser grid
                    motion = motion[: len(motion) // 2] if src.name.endswith("0.tar") else motion[:, ::2, ::2]
                    bad_keys.add(s["__key__"])
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(motion))
                for ext, data in (("webm", s["webm"]), ("json", s["json"]), ("motion.npy", buf.getvalue())):
                    _member(tar, f"{s['__key__']}.{ext}", data)
    loader = build_loader(small_cfg(resampled=False, batch_size=1), str(folder), rank=rank, world_size=2)
    keys = [k for b in loader for k in b.key]
    st = loader.stats()
    assert not set(keys) & bad_keys          # (a rank whose shard holds only a bad sample gets no batch)
    assert st["bad_motion"] == st["skipped"] >= 1 and "but the json says" in loader.last_error()


@pytest.mark.parametrize("content, pattern", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8 text"),
    (b'{"a.webm": {"x": 1}}', r"the label of 'a.webm' is \{'x': 1\}"),
    (b'{"a.webm": [1]}', r"the label of 'a.webm' is \[1\]"),
    (b'{"a.webm": Infinity}', "the label of 'a.webm' is inf"),
    (b'{"a.webm": true}', "the label of 'a.webm' is True"),
])
def test_malformed_labels_file_is_a_clear_error(tmp_path, content, pattern):
    from mohico.datasets.write.shards_inputs import load_labels
    from mohico.errors import UsageError

    path = tmp_path / ("labels.json" if content.startswith(b"{") else "labels.txt")
    path.write_bytes(content)
    with pytest.raises(UsageError, match=pattern):
        load_labels(path)
    good = tmp_path / "good.json"
    good.write_text('{"a.webm": 3, "b.webm": "dog"}')
    assert load_labels(good) == {"a.webm": 3, "b.webm": "dog"}


@pytest.mark.parametrize("name, content", [
    ("labels.txt", "a.webm\tdog\nb.webm\tcat\na.webm\tbird\nb.webm 4\nc.webm\tfish\n"),
    ("labels.json", '{"a.webm": "dog", "b.webm": "cat", "a.webm": "bird", "b.webm": 4, "c.webm": "fish"}'),
])
def test_duplicate_names_in_a_labels_file_are_warned(tmp_path, caplog, name, content):
    from mohico.datasets.write.shards_inputs import load_labels

    path = tmp_path / name
    path.write_text(content)
    with caplog.at_level("WARNING"):
        assert load_labels(path) == {"a.webm": "bird", "b.webm": 4, "c.webm": "fish"}      # the last one wins
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(path) in warned[0] and "'a.webm'" in warned[0] and "'b.webm'" in warned[0]
    assert "c.webm" not in warned[0] and "last" in warned[0]


def test_labels_file_matching_no_video_is_warned(tmp_path, caplog):
    from _videos import object_frames, write_video
    from mohico.datasets.write.shards import write_shards

    src = tmp_path / "videos"
    src.mkdir()
    write_video(src / "clip.webm", object_frames(20))
    labels = tmp_path / "labels.txt"
    labels.write_text("other.webm\tdog\nthird.webm\tcat\n")          # names no input video
    with caplog.at_level("WARNING"):
        man = write_shards(src, tmp_path / "out", labels=labels, short_side=64)
    assert man["num_samples"] == 1
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(labels) in warned and "none of the 1 input videos" in warned and "2 labels" in warned
    assert "'other.webm'" in warned and "clip.webm" in warned          # an example of each side


@pytest.mark.parametrize("inputs", [{"empty.mp4": b"", "notvideo.mp4": b"this is not a video\n"}, {}])
def test_shards_of_only_bad_inputs_exit_1(tmp_path, capsys, inputs):
    """Every input skipped (or none there): `mohico shards` exits 1 saying no video was written
    and why, instead of 0 with '0 videos in 0 shards'."""
    from mohico.launcher.cli import main

    src = tmp_path / "videos"
    src.mkdir()
    for name, data in inputs.items():
        (src / name).write_bytes(data)
    out = tmp_path / "shards"
    assert main(["shards", str(src), str(out), "--quiet", "--workers", "1"]) == 1
    cap = capsys.readouterr()
    assert "error: no video written" in cap.err and str(src) in cap.err and "Traceback" not in cap.err
    if inputs:
        assert f"all {len(inputs)} inputs" in cap.err and "zero-byte" in cap.out and "manifest.json" in cap.err
    else:
        assert "no input files" in cap.err
