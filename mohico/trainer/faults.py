"""Fault injection for tests: kill one rank at a chosen point, as a crash or the OOM killer would.

    faults = Faults.from_env(rank)       # MOHICO_FAULT=save:STEP:RANK or step:STEP:RANK; else no faults
    train(cfg, faults=faults)            # the trainer calls faults.after_step(step) after each optimizer
                                         # step, the checkpointer faults.mid_save(step) once this rank's
                                         # files are written, before the others may publish them

``save:STEP:RANK`` SIGKILLs rank RANK during the save of checkpoint STEP (its files written,
before the barrier); ``step:STEP:RANK`` right after optimizer step STEP; ``enospc:STEP:RANK``
makes rank RANK's DeepSpeed file writes of checkpoint STEP fail with ``OSError(ENOSPC)`` after a
few bytes, between DeepSpeed's own barriers, as a full disk does. The test harness gives
the spec through the environment (``mohico train`` runs in subprocesses).
"""
from __future__ import annotations

import errno
import logging
import os
import signal

from mohico.errors import UsageError

log = logging.getLogger("mohico.trainer")

ENV = "MOHICO_FAULT"
POINTS = ("save", "step", "enospc")


class Faults:
    """Kill this process at ``(where, step)`` (``where`` one of ``POINTS``); ``None``: never."""

    def __init__(self, where: str | None = None, step: int = -1):
        if where is not None and where not in POINTS:
            raise UsageError(f"{ENV}: unknown fault point {where!r} (one of {', '.join(POINTS)})")
        self.where, self.step = where, int(step)

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        """The fault ``MOHICO_FAULT=WHERE:STEP:RANK`` names for ``rank`` (none if unset or another rank)."""
        spec = os.environ.get(ENV, "")
        if not spec:
            return cls()
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise UsageError(f"{ENV}={spec!r}: expected WHERE:STEP:RANK, e.g. save:4:1")
        return cls(parts[0], int(parts[1])) if int(parts[2]) == rank else cls()

    def _hit(self, where: str, step: int) -> None:
        if self.where == where and self.step == step:
            log.warning("%s: killing this rank during %s at step %d", ENV, where, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int) -> None:
        self._hit("step", step)

    def mid_save(self, step: int) -> None:
        self._hit("save", step)

    def disk_full(self, step: int, engine) -> None:
        """``enospc:STEP``: the DeepSpeed ``engine``'s checkpoint writes at ``step`` fail with ENOSPC."""
        if self.where != "enospc" or self.step != step:
            return
        ce = getattr(engine, "checkpoint_engine", None)
        if ce is None:
            return
        log.warning("%s: this rank's checkpoint writes at step %d fail with ENOSPC", ENV, step)

        def full(state_dict, path, *a, **k):
            with open(path, "wb") as f:
                f.write(b"x" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        ce.save = full
