"""The rank side of the loader's worker processes: the forkserver they are forked from (started
here, with the preemption signals blocked, preloading `forkserver_signals`, so that it and the
workers ignore SLURM's preemption signals from their first instruction on), the resource tracker
that outlives those signals too, and the workers' init function (they end once the rank is gone)."""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing import forkserver, resource_tracker, util

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)   # SLURM sends them to every process of the step
PRELOAD = ["__main__", "mohico.datasets.load.forkserver_signals"]

_started_forkserver: int | None = None   # pid of the forkserver `start_forkserver` started


def worker_process_options(rank_pid: int) -> dict:
    """The DataLoader arguments that start the loader's workers: the forkserver context (see
    :func:`forkserver_context`) and :func:`exit_with_rank` as their init function."""
    return dict(multiprocessing_context=forkserver_context(),
                worker_init_fn=functools.partial(exit_with_rank, rank_pid))


def forkserver_context():
    """The forkserver context, its forkserver started by :func:`start_forkserver` (it ignores the
    preemption signals SLURM sends to every process of the step; the forked workers inherit that),
    with this process's resource tracker started by :func:`start_resource_tracker`."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    start_resource_tracker()
    start_forkserver()
    return ctx


def start_forkserver() -> None:
    """Make sure this process's forkserver is one started here, with `forkserver_signals` preloaded
    and the preemption signals blocked while it starts.

    Python starts one forkserver per process and applies the preload list only when it starts
    it: a forkserver started earlier (by another loader, library or test) forks workers that keep
    the default SIGTERM/SIGUSR1 action until their ``worker_init_fn`` runs, seconds later (the
    unpickling imports torch and the dataset), and a preemption signal in that window killed the
    job instead of checkpointing it. Such a forkserver is retired (:func:`_retire_forkserver`)
    and a new one started. The signal mask survives the forkserver's fork and exec, so a signal
    arriving before its preload ran stays pending until `forkserver_signals` ignores (discards)
    it; the mask is blocked only in this thread and only meanwhile, so the rank loses no signal."""
    global _started_forkserver
    server = forkserver._forkserver
    if not hasattr(server, "_forkserver_pid"):
        raise RuntimeError("this Python's multiprocessing.forkserver.ForkServer has no _forkserver_pid: "
                           "mohico's loader needs it to replace a forkserver started without its preload "
                           "(mohico/datasets/load/loader_workers.py:start_forkserver)")
    with server._lock:
        if server._forkserver_pid not in (None, _started_forkserver):
            _retire_forkserver(server)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        server.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _started_forkserver = server._forkserver_pid


def _retire_forkserver(server) -> None:
    """Forget a running forkserver without waiting for it (its lock held by the caller).

    Unlike ``ForkServer._stop``, which waits for it and so for every worker it forked (each holds
    its "alive" pipe), this only closes this process's end of that pipe and unlinks its socket:
    it exits once its last worker has, and a daemon thread reaps it then."""
    pid, address = server._forkserver_pid, server._forkserver_address
    os.close(server._forkserver_alive_fd)
    server._forkserver_alive_fd = server._forkserver_pid = server._forkserver_address = None
    if address and not util.is_abstract_socket_namespace(address):
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
    threading.Thread(target=_reap, args=(pid,), name="forkserver-reaper", daemon=True).start()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:     # reaped elsewhere
        pass


def ignore_preemption_signals() -> None:
    """Ignore SIGUSR1/SIGTERM in this process, then unblock them: a signal held pending by a
    blocked mask is discarded by the SIG_IGN, and the children this process starts (the workers,
    the programs they run) inherit no blocked mask. Never call it in a rank: preemption is its job."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)


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
    ignore_preemption_signals()       # the forkserver's preload did; again in case its import failed

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
