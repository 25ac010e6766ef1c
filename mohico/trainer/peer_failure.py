"""Ranks fail together and say why: failure notes and the message a surviving rank prints.

    note_failure(run_dir, rank, "stalled: ...")           # a rank that is about to stop
    raise MohicoError(peer_failure_message(run_dir, rank, exc))   # a peer whose collective broke
    return failing_together(run_dir, rank, run)                   # both around the training

A rank that stops on its own (an error, the stall watchdog, a signal it could not honour)
writes ``run.dir/logs/failed_rank{r}.txt`` first. When a peer's collective then fails (gloo:
"Connection closed by peer"), the peer names the rank(s) that left notes and their reasons in
one line instead of a backend traceback; a rank that left no note was killed from outside
(SIGKILL, the OOM killer, a lost node).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from mohico.errors import MohicoError
from mohico.utils import atomic_write_text

NOTE = "failed_rank{rank}.txt"
NOTE_WAIT_S = 5.0


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


def read_notes(run_dir, rank: int, wait_s: float = 0.0) -> dict[int, str]:
    """``{peer rank: reason}`` of the other ranks' notes, waiting up to ``wait_s`` for one."""
    logs = Path(run_dir) / "logs"
    deadline = time.monotonic() + wait_s
    notes: dict[int, str] = {}
    while True:     # the failing rank may write its note just after its peers notice
        for p in sorted(logs.glob(NOTE.format(rank="*"))):
            try:
                r = int(p.stem.rsplit("rank", 1)[1])
                if r != rank:
                    notes[r] = p.read_text().strip().split(": ", 1)[-1]
            except (OSError, ValueError, IndexError):
                continue
        if notes or time.monotonic() > deadline:
            return notes
        time.sleep(0.2)


def peer_notes(run_dir, rank: int) -> str:
    """``"; rank 1 stopped: ..."`` for the other ranks' notes ('' if none): for a stall message."""
    return "".join(f"; rank {r} stopped: {msg}" for r, msg in sorted(read_notes(run_dir, rank).items()))


def peer_failure_message(run_dir, rank: int, e: BaseException, wait_s: float = NOTE_WAIT_S) -> str:
    """One line for a rank whose collective failed: which peer rank(s) stopped and why."""
    logs = Path(run_dir) / "logs"
    notes = read_notes(run_dir, rank, wait_s)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if notes:
        who = "; ".join(f"rank {r} stopped: {msg}" for r, msg in sorted(notes.items()))
        return f"rank {rank}: a peer rank stopped, so this one stops too ({who}) [{type(e).__name__}: {first}]"
    return (f"rank {rank}: a peer rank died without a message (killed from outside: SIGKILL, the OOM killer or a "
            f"lost node?); see the other ranks' logs in {logs} [{type(e).__name__}: {first}]")


def failing_together(run_dir, rank: int, run):
    """``run()``, with this rank's failure noted for its peers and a peer's failure (a broken
    collective) turned into one MohicoError line naming that peer; both are logged."""
    import logging

    log = logging.getLogger("mohico.trainer")
    clear_note(run_dir, rank)
    try:
        return run()
    except MohicoError as e:
        note_failure(run_dir, rank, str(e))
        log.error("%s", e)
        raise
    except Exception as e:
        if not is_peer_failure(e):
            note_failure(run_dir, rank, f"{type(e).__name__}: {e}")
            raise
        msg = peer_failure_message(run_dir, rank, e)
        log.error("%s", msg)
        raise MohicoError(msg) from None
