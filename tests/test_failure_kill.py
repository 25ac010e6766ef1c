"""A SIGKILL'd `mohico train --nproc 2` takes its ranks with it (issue 30 item 2): `kill -9 --
-PGID` of the launcher's process group must not leave torchrun and the ranks alive (they are in a
session of their own) writing a checkpoint after the kill and holding run.dir's lock, so that an
immediate restart finds the run.dir free, or waits for the exiting run (bounded, saying so).
The real launcher, CLI and loop around the fake module and loader (tests/_fake_cli_rank.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mohico.launcher.spawn import _worker_pids
from mohico.trainer import checkpoint as ck
from mohico.trainer.run_lock import RunLock
from tests.test_failure_spawn import ROOT, SPAWN, fake_cli_args, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped-later orphan counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def written(run: Path) -> dict:
    """``{file: mtime}`` of what the ranks write (not W&B's service, a process of its own that
    notes its client's death, nor the liveness records that its thread refreshes)."""
    return {p: p.stat().st_mtime_ns for p in run.rglob("*")
            if p.is_file() and "alive_rank" not in p.name and "wandb" not in p.relative_to(run).parts}


def test_sigkill_of_the_launchers_group_takes_torchrun_and_both_ranks_at_once(tmp_path):
    """Rank 0 waits for its 5th batch (after checkpoint step 4), rank 1 in the next collective:
    nothing is being written when the group is killed, so anything written after is the old
    graceful shutdown (SIGINT from the dying agent) that the kill must not allow."""
    run, stalled = tmp_path / "run", tmp_path / "stalled"
    env = {**os.environ, "FAKE_STALL_AT": "5", "FAKE_STALL_RANK": "0", "FAKE_STALL_FILE": str(stalled)}
    with open(tmp_path / "spawn.out", "w") as out:
        launcher = subprocess.Popen([sys.executable, "-c", SPAWN, *fake_cli_args(
            run, "trainer.max_steps=40", "checkpoint.every_steps=2", "trainer.stall_timeout_s=300")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[int] = []
    try:
        wait_for(stalled, launcher)
        assert ck.read_latest(run / "checkpoints") == "step_00000004"
        before = written(run)
        agents = _worker_pids(launcher.pid)
        tree = agents + [p for a in agents for p in _worker_pids(a)]
        assert len(tree) == 3, tree                                 # torchrun and two ranks
        os.killpg(launcher.pid, signal.SIGKILL)                      # kill -9 -- -PGID
        launcher.wait()
        # a restart at once: the run.dir is free, or held by the exiting run only until it is gone
        lock = RunLock(run).acquire()
        lock.release()
        deadline = time.monotonic() + 5          # SIGKILL on the parent's death: gone at once, not after ~10 s
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in tree if alive(p)]
        assert not left, f"still running after the launcher's SIGKILL and the lock's release: {left}"
        after = written(run)
        late = sorted(str(p) for p in after if before.get(p) != after[p] and p.name != ".lock")
        assert not late, f"written after the kill: {late}"
    finally:
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
