"""torchrun's agent for `mohico train --nproc N` (:func:`mohico.launcher.spawn.spawn_local`):
``python -m mohico.launcher.agent ARGS`` is ``python -m torch.distributed.run ARGS`` without
torchrun's own report of a failed rank — its "Sending process ... closing signal" and "failed
(exitcode: N)" log lines and the ~30-line ``ChildFailedError`` traceback — since the launcher
prints the root cause once, with the failing rank's exit code (:mod:`mohico.rank_status`).

With ``MOHICO_DEBUG=1`` (``mohico --debug train``) torchrun speaks as usual. An error of the
agent itself (not of a rank) is one line, and exit code 1.
"""
from __future__ import annotations

import logging
import os
import sys

from mohico.errors import ExitCode

DEBUG_VAR = "MOHICO_DEBUG"


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    debug = os.environ.get(DEBUG_VAR) == "1"
    if debug:
        torchrun(argv)
        return 0
    logging.disable(logging.ERROR)       # this process only: the ranks are processes of their own
    try:
        torchrun(argv)
    except ChildFailedError:             # a rank failed: the launcher reports its own line and code
        return ExitCode.FAILED.value
    except Exception as e:  # noqa: BLE001 - torchrun's own failure (rendezvous, ports): one line
        print(f"[mohico spawn] torchrun failed: {type(e).__name__}: {e} (mohico --debug train ... "
              f"shows its traceback)", file=sys.stderr, flush=True)
        return ExitCode.FAILED.value
    return 0


if __name__ == "__main__":
    from mohico.launcher.process_exit import exit_process

    exit_process(main(sys.argv[1:]))
