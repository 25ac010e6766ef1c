"""End a finished rank's process without the interpreter's C-level teardown.

When a training rank is done, its work is on disk (atomic checkpoint writes, closed logs, W&B
finished, loader workers closed). What the interpreter still does at exit is, first, the Python
part: join the non-daemon threads, run the ``atexit`` hooks (logging's flush, W&B's service
teardown, multiprocessing's child cleanup, ``weakref.finalize`` callbacks), flush stdio; then the
C part: tear down every module and the C++ objects behind them (torch, gloo, DeepSpeed, DALI).
The C part takes 1-2 s per rank on 2 cores after every run (measured: a 2-rank `mohico train`
of 4 steps exits 2.2 s sooner without it), and a destructor that blocks there (a process group's,
a decoder thread pool's) turns a finished job into a hung one.

:func:`exit_process` does the Python part exactly as the interpreter would, then ``os._exit``.
Used where a process's last act is to exit with a training's code: the torchrun worker
(:mod:`mohico.launcher.spawn`), the agent (:mod:`mohico.launcher.agent`) and a `mohico train`
rank started by srun (``python -m mohico train``). Other commands exit the usual way.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Exit with ``code`` (0-255) after what Python's own exit runs for Python code: join the
    non-daemon threads, run the atexit hooks, flush stdout and stderr; skip the module teardown."""
    threading._shutdown()          # what Py_FinalizeEx calls first: wait for the non-daemon threads
    atexit._run_exitfuncs()        # then the atexit hooks, last registered first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):    # closed or replaced stream: nothing to flush
            pass
    os._exit(code)
