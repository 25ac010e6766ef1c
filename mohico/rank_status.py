"""Each rank's exit status for ``mohico train --nproc N`` (:mod:`mohico.launcher.spawn`; a bottom-floor
module, stdlib only, because the trainer's watchdog writes it too): its code,
when it stopped and one line saying why, so that the launcher can report the root cause — the
rank that stopped first — instead of torchrun's 1 or the "a peer rank stopped" 1 of the ranks
that followed it.

    report(5, "stalled: ...")                              # the watchdog, just before os._exit
    report(e.exit_code, str(e), follows_peer=...)          # the CLI, for a MohicoError
    report(code)                                           # the worker wrapper, on the way out

Outside the launcher (``MOHICO_SPAWN_STATUS_DIR`` unset) it does nothing. The first report of a
process wins: it names the cause, and the wrapper's later exit code must not overwrite its line.
Never raises (it runs on the way out).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

STATUS_DIR_VAR = "MOHICO_SPAWN_STATUS_DIR"
LINE_CHARS = 1000
MESSAGE_CHARS = 8000      # the whole message too: the launcher prints it once, the ranks do not
FINAL_ERROR = "mohico_final_error"   # a log record's ``extra`` key: the error this rank stops with, which
                                     # the launcher prints once (the ranks' consoles drop it, their log files keep it)
_reported = False


def report(code: int, line: str = "", follows_peer: bool = False) -> None:
    """Write this rank's ``rank-{RANK}`` status (code, wall time, first line of ``line``, whether
    it stopped only because a peer did), once per process."""
    global _reported
    folder = os.environ.get(STATUS_DIR_VAR)
    if not folder or _reported:
        return
    rank = os.environ.get("RANK", "0")
    first = (str(line).strip().splitlines() or [""])[0][:LINE_CHARS]
    record = {"code": int(code), "time": time.time(), "line": first, "follows_peer": bool(follows_peer),
              "pid": os.getpid(), "message": str(line).strip()[:MESSAGE_CHARS]}
    try:
        tmp = Path(folder, f".rank-{rank}.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, Path(folder, f"rank-{rank}"))
        _reported = True
    except (OSError, ValueError):
        pass


def read(folder: Path, nproc: int) -> dict[int, dict]:
    """``{rank: record}`` of the ranks that reported (a bare code, the old format, is read too)."""
    out = {}
    for r in range(nproc):
        try:
            text = Path(folder, f"rank-{r}").read_text().strip()
        except OSError:
            continue
        try:
            rec = json.loads(text)
            out[r] = rec if isinstance(rec, dict) else {"code": int(rec)}
        except ValueError:
            continue
    return out
