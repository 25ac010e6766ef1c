"""Ranks fail together and say why: failure notes and the message a surviving rank prints.

    note_failure(run_dir, rank, "stalled: ...")           # a rank that is about to stop
    raise PeerFailureError(peer_failure_message(run_dir, rank, exc))   # a peer whose collective broke
    return failing_together(run_dir, rank, run)                   # both around the training

A rank that stops on its own (an error, the stall watchdog, a signal it could not honour)
writes ``run.dir/logs/failed_rank{r}.txt`` first. When a peer's collective then fails (gloo:
"Connection closed by peer"), the peer names the rank(s) that left notes and their reasons in
one line instead of a backend traceback. A rank that left no note was killed from outside
(SIGKILL, the OOM killer, a lost node): the peer names it from its liveness record
(:mod:`mohico.trainer.liveness`: host, pid, seconds since it was last alive, what it was doing,
its log file), once its process is gone from this host or its record went stale.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mohico import dist
from mohico.errors import MohicoError, PeerFailureError
from mohico.rank_status import FINAL_ERROR
from mohico.trainer.liveness import (FINISHED, REFRESH_S, STALE_S, STARTING, STOPPING, AliveRecord, read_peers,
                                     silent_peers)
from mohico.utils import atomic_write_text

NOTE = "failed_rank{rank}.txt"
PEER_WAIT_S = STALE_S + 2 * REFRESH_S       # wait at most this long for a note or a verdict


def _note_path(run_dir, rank: int) -> Path:
    return Path(run_dir) / "logs" / NOTE.format(rank=rank)


def clear_note(run_dir, rank: int) -> None:
    """Remove this rank's note of an earlier run (at start-up)."""
    try:
        _note_path(run_dir, rank).unlink()
    except FileNotFoundError:
        pass


def note_failure(run_dir, rank: int, reason: str) -> None:
    """Record why this rank stops (never raises: it runs on the way out)."""
    try:
        atomic_write_text(_note_path(run_dir, rank), f"{time.time():.3f} pid {os.getpid()}: {reason}\n")
    except Exception:  # noqa: BLE001
        pass


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank went away."""
    try:
        from torch.distributed import DistBackendError
        if isinstance(e, DistBackendError):
            return True
    except ImportError:
        pass
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport", "NCCL",
        "ProcessGroupGloo", "ProcessGroupNCCL"))


def read_notes(run_dir, rank: int) -> dict[int, str]:
    """``{peer rank: reason}`` of the other ranks' notes."""
    notes: dict[int, str] = {}
    for p in sorted((Path(run_dir) / "logs").glob(NOTE.format(rank="*"))):
        try:
            r = int(p.stem.rsplit("rank", 1)[1])
            if r != rank:
                notes[r] = p.read_text().strip().split(": ", 1)[-1]
        except (OSError, ValueError, IndexError):
            continue
    return notes


def peer_notes(run_dir, rank: int, world: int | None = None) -> str:
    """``"; rank 1 stopped: ..."`` for the other ranks' notes and ``"; rank 2 (host, pid: its process
    is gone ...)"`` for ranks killed from outside ('' if none): for a stall message."""
    return ("".join(f"; rank {r} stopped: {msg}" for r, msg in sorted(read_notes(run_dir, rank).items()))
            + "".join(f"; {p.describe()}" for p in silent_peers(run_dir, rank, world or _world())))


def _world() -> int | None:
    try:
        return dist.world() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken group: the world is unknown
        return None


def peer_failure_message(run_dir, rank: int, e: BaseException, wait_s: float = PEER_WAIT_S,
                         world: int | None = None) -> str:
    """One line for a rank whose collective failed: which peer rank(s) stopped and why, or, for a
    rank killed from outside (no note), its host, pid, when it was last alive and its log file.
    Waits up to ``wait_s`` for a note (a failing rank may write it just after its peers notice)
    or a verdict (a record on another host needs STALE_S seconds to go stale). Records of ranks
    at or above ``world`` (default: the process group's size) are an earlier run's."""
    logs = Path(run_dir) / "logs"
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    cause = f"[{type(e).__name__}: {first}]"
    world = world or _world()
    deadline = time.monotonic() + wait_s
    while True:
        notes, dead = read_notes(run_dir, rank), silent_peers(run_dir, rank, world)
        dead = [p for p in dead if p.record.get("rank") not in notes]
        if notes or dead or time.monotonic() > deadline:    # a gone or stale rank will write no note
            break
        time.sleep(0.2)
    killed = "; ".join(p.describe() for p in dead)
    if notes:
        who = "; ".join(f"rank {r} stopped: {msg}" for r, msg in sorted(notes.items()))
        more = f"; killed from outside: {killed}" if killed else ""
        return f"rank {rank}: a peer rank stopped, so this one stops too ({who}{more}) {cause}"
    if dead:
        return (f"rank {rank}: a peer rank was killed from outside (no note: SIGKILL, the OOM killer or a lost node?), "
                f"so this one stops too: {killed} {cause}")
    peers = read_peers(run_dir, rank, world)
    unsure = "; ".join(p.describe() for p in peers if p.record.get("state") not in (STOPPING, FINISHED))
    unsure = f" (not confirmed alive: {unsure})" if unsure else ""
    missing = sorted(set(range(world or 0)) - {rank} - {p.record.get("rank") for p in peers})
    missing = f"; rank(s) {', '.join(map(str, missing))} left no record (died at start-up?)" if missing else ""
    return (f"rank {rank}: a peer rank died without a message (killed from outside: SIGKILL, the OOM killer or a "
            f"lost node?) and no rank's liveness record in {logs} went stale within {wait_s:g} s{unsure}{missing}; "
            f"see the other ranks' logs there {cause}")


def failing_together(run_dir, rank: int, run):
    """``run()``, with this rank's failure noted for its peers and a peer's failure (a broken
    collective) turned into one MohicoError line naming that peer; both are logged. This rank's
    liveness record says it is starting, then (the stall watchdog refreshes it) running, and at
    the end that it finished or is stopping, so that its peers never blame it."""
    log = logging.getLogger("mohico.trainer")
    clear_note(run_dir, rank)
    alive = AliveRecord(run_dir, rank)
    alive.refresh("starting up", STARTING)
    try:
        out = run()
        alive.refresh("training ended", FINISHED)
        return out
    except MohicoError as e:
        note_failure(run_dir, rank, str(e))
        alive.refresh(f"stopped: {str(e)[:200]}", STOPPING)
        log.error("%s", e, extra={FINAL_ERROR: True})
        raise
    except Exception as e:
        if not is_peer_failure(e):
            note_failure(run_dir, rank, f"{type(e).__name__}: {e}")
            alive.refresh(f"stopped: {type(e).__name__}", STOPPING)
            raise
        alive.refresh("stopping: a peer rank failed", STOPPING)
        msg = peer_failure_message(run_dir, rank, e)
        log.error("%s", msg, extra={FINAL_ERROR: True})
        raise PeerFailureError(msg) from None
