"""One training per run directory: an exclusive ``flock`` on ``run.dir/.lock``.

    lock = RunLock(run_dir).acquire()        # rank 0; raises MohicoError naming the holder
    ...
    lock.release()

The lock file holds the holder's host, pid, SLURM job id and start time (JSON), so a second
training started on the same ``run.dir`` fails at once with who holds it (instead of both
writing one ``metrics.jsonl`` and overwriting each other's checkpoints). ``flock`` locks die
with their process, so a stale lock of a crashed or killed run is taken over silently (the old
holder's details are only a record). :func:`acquire_on_rank0` runs it as a collective: rank 0
takes the lock and every rank raises the same error if that failed.

A holder that is exiting — on this host, and its process or its `mohico train --nproc N`
launcher is gone (a SIGKILL'd launcher takes its ranks with it, but their exit takes a moment) —
is waited for, up to ``EXITING_WAIT_S`` seconds, saying so, instead of refusing the restart.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from mohico import dist
from mohico.errors import ConfigError, MohicoError
from mohico.utils import unwritable_dir

LOCK_NAME = ".lock"
LAUNCHER_PID_VAR = "MOHICO_SPAWN_LAUNCHER_PID"     # mirrors mohico.launcher.spawn
EXITING_WAIT_S = 30.0
log = logging.getLogger("mohico.trainer")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` held until :meth:`release`
    (or the process ends)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:      # (the rule `mohico train --dry-run` checks: mohico.utils.unwritable_dir)
            raise ConfigError(unwritable_dir(self.path.parent, "run.dir")
                              or f"'run.dir': cannot write {self.path} ({e}). Set run.dir to a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raw = os.pread(fd, 4096, 0)
            exiting = _exiting(raw)
            if not exiting or not _wait_for_lock(fd, self.path, _describe(raw), exiting):
                holder = _describe(os.pread(fd, 4096, 0) or raw)
                os.close(fd)
                late = f"; it was exiting ({exiting}) but still held the lock after {EXITING_WAIT_S:g} s" if exiting else ""
                raise MohicoError(f"run.dir {self.path.parent} is in use by another training ({holder}{late}); two "
                                  f"trainings on one run.dir would overwrite each other's checkpoints and logs. "
                                  f"Wait for it (or stop it), or use another run.dir.") from None
        launcher = os.environ.get(LAUNCHER_PID_VAR, "")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "launcher_pid": int(launcher) if launcher.isdigit() else None}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    stat = Path(f"/proc/{int(pid)}/stat")
    try:
        text = stat.read_text()
        return text[text.rindex(")") + 2] != "Z"      # a zombie has exited
    except (OSError, ValueError, IndexError):
        return True


def _exiting(raw: bytes) -> str:
    """Why the lock's holder is exiting ('' if it is not known to be): it is on this host and its
    process, or the launcher that started it, is gone."""
    try:
        info = json.loads(raw.decode() or "{}")
    except ValueError:
        return ""
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return ""
    if info.get("pid") and not _alive(info["pid"]):
        return f"pid {info['pid']} is gone"
    if info.get("launcher_pid") and not _alive(info["launcher_pid"]):
        return f"its launcher, pid {info['launcher_pid']}, is gone"
    return ""


def _wait_for_lock(fd: int, path: Path, holder: str, why: str) -> bool:
    """Wait up to EXITING_WAIT_S for an exiting holder to release the lock; True once taken."""
    log.warning("run.dir %s is locked by a training that is exiting (%s: %s): waiting up to %g s for it to "
                "release the lock", path.parent, holder, why, EXITING_WAIT_S)
    deadline = time.monotonic() + EXITING_WAIT_S
    while time.monotonic() < deadline:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            log.info("run.dir %s: the exiting training released the lock", path.parent)
            return True
        except OSError:
            time.sleep(0.05)
    return False


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode() or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict) or not info:
        return "holder unknown"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}{job}, since {info.get('started', '?')}"


def acquire_on_rank0(run_dir: str | os.PathLike, rank: int) -> RunLock | None:
    """Rank 0 takes the lock (collective): returns it on rank 0, None elsewhere; every rank
    raises the MohicoError if rank 0 could not take it."""
    lock, error = None, ""
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except MohicoError as e:
            error = str(e)
    error = dist.broadcast_object(error, src=0)
    if error:
        raise MohicoError(error)
    return lock
