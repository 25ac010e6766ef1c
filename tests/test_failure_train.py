"""Training-loop failure behaviour (issue 14, items 1, 4, 6): NaN stops and is never
checkpointed, a stalled loader or a signal during a hang end the process within a bound, and one
run.dir holds one training. The real loop (DeepSpeed, gloo) around a fake module and loader
(tests/_fake_train.py); no test waits for a collective timeout."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
import torch

from mohico.trainer import checkpoint as ck
from mohico.trainer.run_lock import RunLock
from tests._fake_train import run_fake_train

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_nan_on_one_rank_skips_on_both_then_stops_with_exit_4_keeping_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    out = run_fake_train(run, world=2, overrides=["trainer.max_steps=12", "trainer.nonfinite_limit=3"],
                         env={"FAKE_NAN_AT": "4", "FAKE_NAN_RANK": "1"})
    for status, kind, msg, code in out:    # both ranks stop together, with the same message
        assert (status, kind, code) == ("error", "NonFiniteError", 4)
        assert "stopped at step 6" in msg and "3 micro-steps in a row" in msg and "optim.lr" in msg
    assert ck.complete_tags(run / "checkpoints") == ["step_00000002"]   # step 4 was due but not finite
    assert ck.read_latest(run / "checkpoints") == "step_00000002"
    losses = {r["step"]: r["loss"] for r in rows(run)}
    assert all(v == v for s, v in losses.items() if s <= 3) and all(v != v for s, v in losses.items() if s >= 4)
    log = (run / "logs" / "train_rank0.log").read_text()        # rank 0's loss was finite: it skipped too
    assert "step 4: non-finite loss on at least one rank" in log and "checkpoint deferred" in log


def test_stalled_loader_ends_both_ranks_with_exit_5_naming_the_loader_state(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank [01] exited with code 5"):   # rank 0: its own watchdog or the peer line
        run_fake_train(run, world=2, overrides=["trainer.stall_timeout_s=8"],
                       env={"FAKE_STALL_AT": "3", "FAKE_STALL_RANK": "1"})
    assert time.monotonic() - t0 < 150
    log = (run / "logs" / "train_rank1.log").read_text()
    assert "stalled: no progress for" in log and "waiting for the next batch" in log
    assert "'skipped': 3" in log and "metadata json missing" in log
    # rank 0, blocked in a collective, stops too with one line naming rank 1 and its reason: at once when
    # the backend sees rank 1 go, or from its own watchdog when both time out together
    log0 = (run / "logs" / "train_rank0.log").read_text()
    assert ("rank 0: a peer rank stopped, so this one stops too (rank 1 stopped: stalled: no progress" in log0
            or "waiting for the forward/backward pass and its collectives; loader counters" in log0
            and "; rank 1 stopped: stalled: no progress" in log0), log0
    assert "Traceback" not in log0
    assert ck.read_latest(run / "checkpoints") == "step_00000002"


def test_sigterm_during_a_hang_exits_6_within_the_grace_period(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="rank 0 exited with code 6"):
        run_fake_train(run, world=1, overrides=["trainer.stall_timeout_s=300", "trainer.signal_grace_s=3"],
                       env={"FAKE_STALL_AT": "3", "FAKE_SIGNAL_SELF": "1"})
    log = (run / "logs" / "train_rank0.log").read_text()
    assert "SIGTERM: the training loop did not reach a step boundary within trainer.signal_grace_s=3" in log
    assert "without a checkpoint" in log and ck.read_latest(run / "checkpoints") == "step_00000002"


def test_second_training_on_a_locked_run_dir_fails_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    try:
        out = run_fake_train(run, world=2)
    finally:
        lock.release()
    for status, kind, msg, code in out:
        assert status == "error" and code == 1
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "another run.dir" in msg
    assert not (run / "checkpoints").exists() and not (run / "logs").exists()   # it wrote nothing


def test_sigkilled_rank_is_named_by_its_peer_with_host_pid_and_log(tmp_path):
    """Issue 14 item 3: a rank killed from outside leaves no note; its peer still names it (rank,
    host, pid, seconds since it was last alive, its log file), within a bound, not after a
    collective timeout."""
    run, kill_file = tmp_path / "run", tmp_path / "killed.json"
    with pytest.raises(RuntimeError, match=r"rank 1 exited with code -9"):   # rank 0 returned on its own
        run_fake_train(run, world=2, overrides=["trainer.max_steps=40", "trainer.stall_timeout_s=60",
                                                "trainer.dist_timeout_s=60"],
                       env={"FAKE_KILL_AT": "8", "FAKE_KILL_RANK": "1", "FAKE_KILL_FILE": str(kill_file)},
                       timeout=150)
    killed = json.loads(kill_file.read_text())
    assert time.time() - killed["time"] < 45           # far below the 60 s stall / collective timeouts
    log0 = (run / "logs" / "train_rank0.log").read_text()
    line = next(x for x in log0.splitlines() if "rank 0: a peer rank" in x)
    assert "rank 1" in line and f"pid {killed['pid']}" in line and socket.gethostname() in line, line
    assert "last alive" in line and str(run / "logs" / "train_rank1.log") in line, line
    assert not (run / "logs" / "failed_rank1.txt").exists()     # it was named without a note
    assert "Traceback" not in log0


@pytest.fixture(scope="module")
def fake_run_at_step_2(tmp_path_factory):
    """A finished 2-step fake run (one rank), trained once for the tests that tamper with a copy."""
    run = tmp_path_factory.mktemp("fake2") / "run"
    assert run_fake_train(run, overrides=["trainer.max_steps=2"]) == [("rc", 0)]
    return run


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_resume_refuses_a_deepspeed_file_that_would_run_code(fake_run_at_step_2, tmp_path, name):
    """Issue 30 item 3: DeepSpeed's own model and optimizer files are read with weights_only=True
    on resume: a crafted file (its pickle creates a marker file when loaded), with the meta's
    digests rewritten so that the integrity check passes, stops the run naming the file, and no
    code ran."""
    from tests.test_failure_checkpoint import Hostile
    from mohico.trainer.checkpoint.verify import file_digests

    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(fake_run_at_step_2, run)
    folder = run / "checkpoints" / "step_00000002"
    obj = torch.load(folder / name, map_location="cpu", weights_only=False)   # our own file
    obj["hostile"] = Hostile(marker)
    torch.save(obj, folder / name)
    meta = json.loads((folder / ck.META).read_text())
    meta["files"].update(file_digests([folder / name]))
    (folder / ck.META).write_text(json.dumps(meta))
    out = run_fake_train(run, overrides=["trainer.max_steps=4"])
    assert not marker.exists(), f"loading {name} on resume ran code ({out})"
    [(status, kind, msg, code)] = out
    assert (status, kind, code) == ("error", "MohicoError", 1), msg
    assert str(folder / name) in msg and "never loads" in msg, msg


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 160 KiB tmpfs: the fake run's checkpoint takes ~68 KiB and its run dir ~84 KiB after step 2, so
    step 2 fits and, with checkpoint.keep=2, a later one cannot (two kept + one being written > 160 KiB);
    skipped, saying why, where mounting is not allowed."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(res.stderr or res.stdout).strip()[:120]}); the injected "
                    "ENOSPC test covers the mechanism")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_real_full_disk_stops_both_ranks_with_exit_1_and_keeps_the_last_checkpoint(small_tmpfs):
    """The same probe on a real small tmpfs (issue 30): the disk fills at some checkpoint; no hang,
    exit 1 on both ranks naming disk full and the last intact checkpoint, the partial folder
    removed, the intact checkpoints kept and `latest` the newest of them."""
    run = small_tmpfs / "run"
    out = run_fake_train(run, world=2, overrides=["trainer.max_steps=40", "trainer.stall_timeout_s=300"], timeout=90)
    assert [(o[0], o[-1]) for o in out] == [("error", 1), ("error", 1)], out
    tags = ck.complete_tags(run / "checkpoints")
    assert tags and ck.read_latest(run / "checkpoints") == tags[-1], tags
    assert any("disk full" in o[2] and f"the last intact checkpoint is {run / 'checkpoints' / tags[-1]}" in o[2]
               for o in out), out
    assert not list((run / "checkpoints").glob(".tmp-step_*"))


def test_disk_full_during_a_checkpoint_stops_both_ranks_at_once_with_exit_1(tmp_path):
    """Rank 1's DeepSpeed writes of checkpoint 4 fail with ENOSPC (MOHICO_FAULT=enospc:4:1), between
    DeepSpeed's own barriers: rank 1 says disk full (path, size needed, last intact checkpoint), the
    partial folder is removed, and rank 0 stops with rank 1's message, both exit 1 long before the
    stall watchdog (300 s here) -- they used to wait at 'checkpoint step 4 to be written by every rank'."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    out = run_fake_train(run, world=2, overrides=["trainer.max_steps=6", "trainer.stall_timeout_s=300"],
                         env={"MOHICO_FAULT": "enospc:4:1"}, timeout=60)
    assert time.monotonic() - t0 < 60
    last = str(run / "checkpoints" / "step_00000002")
    assert [(o[0], o[-1]) for o in out] == [("error", 1), ("error", 1)], out
    for rank, (status, kind, msg, code) in enumerate(out):
        assert "rank 1: disk full while writing checkpoint step 4" in msg, (rank, msg)
        assert ".tmp-step_00000004" in msg and "MiB (the size of the previous checkpoint)" in msg, msg
        assert f"the last intact checkpoint is {last}" in msg, msg
    assert not (run / "checkpoints" / ".tmp-step_00000004").exists()
    assert ck.complete_tags(run / "checkpoints") == ["step_00000002"]
    assert ck.read_latest(run / "checkpoints") == "step_00000002"
