"""The rank side of the loader's worker processes: the forkserver context they are forked from
(it preloads `forkserver_signals`, so they ignore SLURM's preemption signals) and their init
function (they end once the rank is gone)."""
from __future__ import annotations

import os


def forkserver_context():
    """The forkserver context, preloading `forkserver_signals` (it ignores the preemption signals
    SLURM sends to every process of the step; the forked workers inherit that)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "mohico.datasets.load.forkserver_signals"])
    return ctx


def exit_with_rank(rank_pid: int, _worker_id: int) -> None:
    """Worker init: end this worker (and its forkserver) once the rank process is gone.

    A rank killed with SIGKILL never shuts its DataLoader down; its worker would block forever
    in the queue's feeder thread and, with the forkserver, keep the rank's stdout/stderr open
    (a caller reading them would hang). A daemon thread polls the rank's pid once a second.
    """
    import signal
    import threading
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM):   # also when the forkserver predates the preload
        signal.signal(sig, signal.SIG_IGN)

    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(rank_pid, 0)
            except ProcessLookupError:
                parent = os.getppid()
                if parent not in (1, rank_pid):      # the forkserver that served this rank
                    try:
                        os.kill(parent, signal.SIGKILL)
                    except OSError:
                        pass
                os._exit(1)
            except PermissionError:                  # pid reused by another user's process
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-rank", daemon=True).start()
