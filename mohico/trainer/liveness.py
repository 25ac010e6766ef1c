"""Liveness records: which rank runs where, and when it was last alive, so that a peer can
name a rank killed from outside (SIGKILL, the OOM killer, a lost node), which leaves no note.

    alive = AliveRecord(run_dir, rank)
    alive.refresh("waiting for the next batch")   # the stall watchdog's thread, every REFRESH_S
    alive.refresh("stopping: a peer rank failed", state=STOPPING)
    for peer in silent_peers(run_dir, rank, world): print(peer.describe())

Each rank keeps ``run.dir/logs/alive_rank{r}.json``: ``{"rank", "host", "pid", "start" (the
process start time from /proc, against pid reuse), "time" (last alive, epoch seconds), "doing",
"state"}``. It is written atomically, never on the training loop's thread (no per-step I/O).

A peer's verdict on a record (:func:`verdict`): ``gone`` if it ran on this host and its process
no longer exists (or is a zombie, or the pid now belongs to another process); ``silent`` if it
was not refreshed for STALE_S seconds (another host: a lost node, or a killed process). A rank
that said it is stopping or finished is never blamed. Records of another host compare clocks:
keep the nodes' clocks in sync (NTP), as any cluster does.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mohico.utils import atomic_write_json

RECORD = "alive_rank{rank}.json"
REFRESH_S = 5.0          # the watchdog refreshes a running rank's record this often
STALE_S = 15.0           # not refreshed for this long: the rank is silent (three missed refreshes)
STARTING, RUNNING, STOPPING, FINISHED = "starting", "running", "stopping", "finished"


def record_path(run_dir, rank: int) -> Path:
    return Path(run_dir) / "logs" / RECORD.format(rank=rank)


def log_path(run_dir, rank: int) -> Path:
    """The rank's own log file (``mohico.trainer.train.setup_logging``)."""
    return Path(run_dir) / "logs" / f"train_rank{rank}.log"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), ``"zombie"``
    for a process that ended but was not reaped yet, None where /proc cannot tell (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()      # after "pid (comm)": state, ppid, ...
    if not fields or fields[0] in ("Z", "X"):     # a zombie (killed, not yet reaped) is gone
        return "zombie"
    return fields[19] if len(fields) > 19 else None


class AliveRecord:
    """This rank's liveness record; :meth:`refresh` never raises (it runs on a watchdog thread
    and on the way out, where a full disk must not end the process)."""

    REFRESH_S = REFRESH_S

    def __init__(self, run_dir, rank: int):
        self.path = record_path(run_dir, rank)
        self.rank = rank
        self.fields = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                       "start": _proc_start(os.getpid())}

    def refresh(self, doing: str, state: str = RUNNING) -> None:
        try:
            atomic_write_json(self.path, {**self.fields, "time": round(time.time(), 3), "doing": doing, "state": state})
        except Exception:  # noqa: BLE001
            pass


def process_gone(pid: int, start: str | None) -> bool:
    """True if the process ``pid`` (started at ``start``, /proc ticks) no longer runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:       # exists, another user's
        pass
    now = _proc_start(pid)
    return now == "zombie" or (start is not None and now is not None and now != start)


@dataclass
class PeerState:
    """A peer rank's record and this rank's verdict on it (``gone``, ``silent`` or '')."""
    record: dict
    verdict: str
    age_s: float
    log: Path

    def describe(self) -> str:
        r = self.record
        why = {"gone": f"its process is gone from {r.get('host')}", "silent": f"silent for {self.age_s:.0f} s"}
        return (f"rank {r.get('rank')} (host {r.get('host')}, pid {r.get('pid')}: {why.get(self.verdict, 'alive')}; "
                f"last alive {self.age_s:.1f} s ago, {r.get('doing')}; log {self.log})")


def verdict(record: dict, now: float | None = None, host: str | None = None) -> str:
    """``gone``, ``silent`` or '' (alive, starting, stopping or finished) for a peer's record."""
    if record.get("state") in (STOPPING, FINISHED):
        return ""
    if record.get("host") == (host or socket.gethostname()):
        try:
            if process_gone(int(record["pid"]), record.get("start")):
                return "gone"
        except (KeyError, TypeError, ValueError):
            pass
        return ""              # the process runs (a stale record on this host: its watchdog is busy or off)
    if record.get("state") == RUNNING and (now or time.time()) - float(record.get("time", 0)) > STALE_S:
        return "silent"
    return ""                  # another host, starting up: the watchdog does not refresh it yet


def read_peers(run_dir, rank: int, world: int | None = None) -> list[PeerState]:
    """The other ranks' records (ranks below ``world`` if given) with a verdict on each."""
    now, host, out = time.time(), socket.gethostname(), []
    for p in sorted((Path(run_dir) / "logs").glob(RECORD.format(rank="*"))):
        try:
            rec = json.loads(p.read_text())
            r = int(rec["rank"])
        except (OSError, ValueError, KeyError, TypeError):
            continue                                   # being replaced, or not ours
        if r == rank or (world is not None and r >= world):
            continue
        out.append(PeerState(rec, verdict(rec, now, host), now - float(rec.get("time", now)), log_path(run_dir, r)))
    return out


def silent_peers(run_dir, rank: int, world: int | None = None) -> list[PeerState]:
    """The peers whose process is gone (this host) or whose record went stale (another host)."""
    return [p for p in read_peers(run_dir, rank, world) if p.verdict]
