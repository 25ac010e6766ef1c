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


def _holder(tmp_path, launcher_pid: int) -> subprocess.Popen:
    """A process holding run.dir's lock, started by the launcher ``launcher_pid``, until its stdin closes."""
    code = ("import sys; from mohico.trainer.run_lock import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd(), "MOHICO_SPAWN_LAUNCHER_PID": str(launcher_pid)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_restart_waits_for_a_holder_whose_launcher_is_gone_saying_so(tmp_path):
    """Issue 30 item 2: the ranks of a SIGKILL'd launcher take a moment to go; a restart waits for
    them (bounded, with a warning) instead of refusing the run.dir."""
    import logging

    gone = subprocess.Popen(["true"])
    gone.wait()                                  # a launcher that is gone
    proc = _holder(tmp_path, gone.pid)
    said = []

    class OnWarning(logging.Handler):            # the holder exits once the restart says it waits
        def emit(self, record):
            said.append(record.getMessage())
            if "exiting" in record.getMessage():
                proc.stdin.close()

    handler = OnWarning(level=logging.WARNING)
    logging.getLogger("mohico.trainer").addHandler(handler)
    try:
        RunLock(tmp_path).acquire().release()
    finally:
        logging.getLogger("mohico.trainer").removeHandler(handler)
        proc.kill()
        proc.wait()
    assert any(f"its launcher, pid {gone.pid}, is gone" in m and "waiting up to 30 s" in m and str(tmp_path) in m
               for m in said), said


def test_a_holder_whose_launcher_lives_is_refused_at_once(tmp_path):
    proc = _holder(tmp_path, os.getpid())
    try:
        with pytest.raises(MohicoError, match=f"in use by another training \\(host {socket.gethostname()}, "
                                              f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
