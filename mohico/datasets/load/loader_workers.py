"""The rank side of the loader's worker processes: the forkserver context they are forked from
(it preloads `forkserver_signals`, so they ignore SLURM's preemption signals), the resource
tracker that outlives those signals too, and the workers' init function (they end once the rank
is gone)."""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import resource_tracker

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)   # SLURM sends them to every process of the step


def worker_process_options(rank_pid: int) -> dict:
    """The DataLoader arguments that start the loader's workers: the forkserver context (see
    :func:`forkserver_context`) and :func:`exit_with_rank` as their init function."""
    return dict(multiprocessing_context=forkserver_context(),
                worker_init_fn=functools.partial(exit_with_rank, rank_pid))


def forkserver_context():
    """The forkserver context, preloading `forkserver_signals` (it ignores the preemption signals
    SLURM sends to every process of the step; the forked workers inherit that), with this
    process's resource tracker started by :func:`start_resource_tracker`."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "mohico.datasets.load.forkserver_signals"])
    start_resource_tracker()
    return ctx


def start_resource_tracker() -> None:
    """Start this process's multiprocessing resource tracker (if it is not running yet) with the
    preemption signals blocked, so that they stay blocked in it.

    The tracker holds the names of the loader queues' semaphores (the forkserver and its workers
    share it). Python makes it ignore SIGINT and SIGTERM only, so SLURM's USR1 killed it: the rank
    then relaunched an empty tracker at exit, and every semaphore's unregister printed a
    ``KeyError: '/mp-...'`` traceback (and a rank killed later would leak them). A signal mask,
    unlike a handler, survives the tracker's fork and exec; here it is blocked only in this thread
    and only while the tracker starts, so a USR1 arriving meanwhile is delivered to the rank
    afterwards, not lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def exit_with_rank(rank_pid: int, _worker_id: int) -> None:
    """Worker init: end this worker (and its forkserver) once the rank process is gone.

    A rank killed with SIGKILL never shuts its DataLoader down; its worker would block forever
    in the queue's feeder thread and, with the forkserver, keep the rank's stdout/stderr open
    (a caller reading them would hang). A daemon thread polls the rank's pid once a second.
    """
    for sig in PREEMPTION_SIGNALS:                 # also when the forkserver predates the preload
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
