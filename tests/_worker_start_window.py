"""A rank whose loader worker is held inside its start while SIGTERM/SIGUSR1 reach it
(``python -m tests._worker_start_window FOLDER``; run by tests/test_failure_data.py).

The window: a worker forked by the forkserver runs the default action of a signal until its
dispositions say otherwise; the loader's workers must ignore the preemption signals from the
fork on, not only from their ``worker_init_fn`` on. The rank here first starts a forkserver
without mohico's preload, as another library or an earlier loader could have (Python starts one
per process and applies the preload list only when it starts it). Its one worker, while it
unpickles its dataset (before its ``worker_init_fn``), writes its pid to the fifo ``started``
and waits on the fifo ``go``; the rank sends it SIGTERM and SIGUSR1 in between, then closes its
end of ``go`` and takes a batch. It prints ``served by PID`` when the worker outlived the signals,
and checks that the forkserver it came from ignores them too.
"""
from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import sys
from multiprocessing.connection import wait

from torch.utils.data import DataLoader, IterableDataset

from mohico.datasets.load.loader_workers import worker_process_options


class GatedStart(IterableDataset):
    """One item (the worker's pid); unpickling it in the worker waits on the rank (see above)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(os.path.join(self.folder, "go")) as go:          # opened before `started` is written:
            with open(os.path.join(self.folder, "started"), "w") as f:   # the rank holds a writer of it
                f.write(str(os.getpid()))
            go.read()                    # EOF once the rank closes its end

    def __iter__(self):
        yield os.getpid()


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def ignored_signals(pid: int) -> set[int]:
    """The signals a process ignores (SIG_IGN), from the SigIgn mask in /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def main(folder: str) -> None:
    fifos = {}
    for name in ("started", "go"):
        os.mkfifo(os.path.join(folder, name))
        fifos[name] = os.open(os.path.join(folder, name), os.O_RDWR)    # held open: the worker never waits to open
    multiprocessing.forkserver.ensure_running()            # a forkserver without mohico's preload
    loader = DataLoader(GatedStart(folder), batch_size=None, num_workers=1,
                        **worker_process_options(os.getpid()))
    it = iter(loader)
    ready = wait([fifos["started"], it._workers[0].sentinel])
    assert fifos["started"] in ready, "the worker ended before it reached the window"
    worker = int(os.read(fifos["started"], 64))               # the worker is inside its start
    server = parent_pid(worker)
    assert server != os.getpid(), "the worker's parent is the rank, not a forkserver"
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(worker, sig)
    os.close(fifos["go"])                 # the worker's read of `go` ends: no writer is left
    try:
        print(f"served by {next(it)} (worker {worker}, forkserver {server})", flush=True)
    except RuntimeError as e:              # torch: "DataLoader worker (pid(s) ...) exited unexpectedly"
        code = it._workers[0].exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise SystemExit(f"the worker {worker} died inside its start ({how}): {e}") from e
    missing = {signal.SIGTERM, signal.SIGUSR1} - ignored_signals(server)
    assert not missing, f"the forkserver {server} does not ignore {sorted(signal.Signals(s).name for s in missing)}"
    del it


if __name__ == "__main__":
    main(sys.argv[1])
