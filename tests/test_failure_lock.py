"""run.dir lock units (issue 14, item 6): a held lock names its holder, a dead holder's lock is
taken over, a released lock is free again."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from mohico.errors import MohicoError
from mohico.trainer.run_lock import RunLock


def test_held_lock_names_host_pid_and_slurm_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = RunLock(tmp_path).acquire()
    with pytest.raises(MohicoError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, SLURM job 4242" in msg and str(tmp_path) in msg
    first.release()
    RunLock(tmp_path).acquire().release()     # free again


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; from mohico.trainer.run_lock import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(MohicoError, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = RunLock(tmp_path).acquire()        # stale: its holder is dead
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    lock.release()
