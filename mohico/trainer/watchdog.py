"""Bounded waits: a stall watchdog and a grace period after SIGTERM/SIGUSR1.

    dog = Watchdog(stall_s=600, grace_s=90, describe=lambda: "loader stats ...").start()
    for step ...:
        batch = next(data); dog.beat()
    dog.stop()

- **Dead loader worker**: ``probe()`` (the loader's ``dead_workers``) is checked every second;
  a worker killed mid-write (the OOM killer) can leave the rank blocked forever in the queue,
  so a dead worker ends the process at once (code 5) naming its pid and signal.
- **Stall**: no :meth:`Watchdog.beat` for ``stall_s`` seconds (no batch from the loader, a peer
  rank gone silent in a collective, a save that never ends) -> the log names what was
  awaited, the loader's counters and last error, and the process exits with code 5.
- **Signal grace**: SIGTERM/SIGUSR1 normally make the training loop checkpoint at the next step
  boundary (:mod:`mohico.trainer.preemption`). If that boundary is not reached within
  ``grace_s`` seconds (the main thread is blocked in the loader or a collective, where Python
  cannot even run its signal handler), the process says so and exits with code 6, without
  saving: the last published checkpoint stays intact. The signal is seen through
  ``signal.set_wakeup_fd``, which CPython's C-level handler writes to at once, whatever the
  main thread is doing.
- **Liveness**: the stall thread also refreshes this rank's ``liveness`` record
  (:class:`mohico.trainer.liveness.AliveRecord`: host, pid, time, what the loop waits for) every
  ``liveness.REFRESH_S`` seconds, off the training loop's thread, so that a peer can name this
  rank if it is killed from outside.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

from mohico import rank_status
from mohico.errors import ExitCode

log = logging.getLogger("mohico.trainer")

STALLED_EXIT_CODE = ExitCode.STALLED.value
SIGNAL_TIMEOUT_EXIT_CODE = ExitCode.SIGNALLED_UNSAVED.value
GRACE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001
            pass


def _die(code: int, message: str, on_die: Callable[[str], None] | None = None) -> None:
    log.error(message, extra={rank_status.FINAL_ERROR: True})   # the launcher prints it once (the log file keeps it)
    if on_die is not None:
        on_die(message)
    _flush_logs()
    rank_status.report(code, message)     # under `mohico train --nproc N`: the launcher names this rank's cause
    os._exit(code)


class Watchdog:
    """Daemon threads that end the process when the training loop stops making progress."""

    def __init__(self, stall_s: float, grace_s: float, describe: Callable[[], str] = lambda: "",
                 probe: Callable[[], str] | None = None, on_die: Callable[[str], None] | None = None,
                 liveness=None):
        self.stall_s, self.grace_s, self.describe = float(stall_s), float(grace_s), describe
        self.probe, self.on_die, self.liveness = probe, on_die, liveness
        self.waiting_for = "the first batch"
        self._slack = 0.0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._pipe: tuple[int, int] | None = None
        self._grace_thread: threading.Thread | None = None
        self._stall_thread: threading.Thread | None = None
        self._old_wakeup = -1

    def beat(self, next_wait: str = "the next batch", collective: bool = False) -> None:
        """Progress was made; ``next_wait`` names what the loop waits for now. While waiting in a
        ``collective`` the limit is a quarter longer (at most 60 s): a peer stuck on its own data
        times out first and says why, and this rank then names it."""
        self._last = time.monotonic()
        self.waiting_for = next_wait
        self._slack = min(0.25 * self.stall_s, 60.0) if collective else 0.0

    def start(self) -> "Watchdog":
        if self.stall_s > 0 or self.probe is not None or self.liveness is not None:
            self._stall_thread = threading.Thread(target=self._watch_stall, name="mohico-stall-watchdog", daemon=True)
            self._stall_thread.start()
        if self.grace_s > 0 and threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._pipe = (r, w)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._grace_thread = threading.Thread(target=self._watch_signals, name="mohico-signal-grace",
                                                  daemon=True)
            self._grace_thread.start()
        return self

    def stop(self) -> None:
        """End both threads; never raises (it runs in the trainer's cleanup, which must go on to
        close the loader and W&B). The pipe is closed here, after the grace thread has ended, so
        the wake-up write can never meet a closed read end."""
        self._stop.set()
        if self._stall_thread is not None:     # no liveness refresh after stop(): the caller writes the last one
            self._stall_thread.join(5.0)
        if self._pipe is None:
            return
        r, w = self._pipe
        self._pipe = None
        signal.set_wakeup_fd(self._old_wakeup)
        try:
            os.write(w, b"\0")                  # wake the grace thread if it is blocked in read()
        except OSError:                          # pipe full (BlockingIOError): it has bytes to wake on anyway
            pass
        if self._grace_thread is not None:
            self._grace_thread.join(5.0)
        os.close(w)
        if self._grace_thread is None or not self._grace_thread.is_alive():
            os.close(r)                          # else a daemon thread still reads it: the OS closes it at exit

    def _watch_stall(self) -> None:
        refreshed = -float("inf")
        while True:
            if self.liveness is not None and time.monotonic() - refreshed >= self.liveness.REFRESH_S:
                self.liveness.refresh(f"waiting for {self.waiting_for}")        # never raises
                refreshed = time.monotonic()
            if self._stop.wait(1.0):
                return
            dead = self.probe() if self.probe is not None else ""
            if dead:
                _die(STALLED_EXIT_CODE, f"{dead}; {self.describe()}. Exiting with code {STALLED_EXIT_CODE} (the rank "
                     f"could wait forever for its batch); the last published checkpoint is intact.", self.on_die)
            idle = time.monotonic() - self._last
            if self.stall_s > 0 and idle > self.stall_s + self._slack:
                time.sleep(1.0)      # a peer that timed out at the same moment leaves its note (describe)
                idle = time.monotonic() - self._last
                _die(STALLED_EXIT_CODE,
                     f"stalled: no progress for {idle:.0f} s (trainer.stall_timeout_s={self.stall_s:g}) while waiting "
                     f"for {self.waiting_for}; {self.describe()}. Exiting with code {STALLED_EXIT_CODE}; the last "
                     f"published checkpoint is intact.", self.on_die)

    def _watch_signals(self) -> None:
        r = self._pipe[0]       # closed by stop(), once this thread has ended
        while not self._stop.is_set():
            data = os.read(r, 64)
            if self._stop.is_set():
                break
            sigs = [b for b in data if b in GRACE_SIGNALS]
            if sigs:
                name = signal.Signals(sigs[0]).name
                if not self._stop.wait(self.grace_s):
                    _die(SIGNAL_TIMEOUT_EXIT_CODE,
                         f"{name}: the training loop did not reach a step boundary within trainer.signal_grace_s="
                         f"{self.grace_s:g} s (waiting for {self.waiting_for}; {self.describe()}), so no consistent "
                         f"state could be saved: exiting with code {SIGNAL_TIMEOUT_EXIT_CODE} without a checkpoint. "
                         f"The last published checkpoint is intact and a restart resumes from it.", self.on_die)
