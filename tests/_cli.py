"""`mohico` commands run by the CLI's ``main`` inside the test process (tests that check a command's
exit code and output, where a fresh interpreter per command would only add its imports)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def run_cli_in_process(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``mohico ARGV`` run by the CLI's ``main`` in this process, from ``cwd`` with ``env`` added to the
    environment (the folder and the whole environment restored after, W&B's service address
    included): exit code, stdout and stderr as a CompletedProcess. Saves the
    ~3-4 s a fresh interpreter spends importing torch for each command."""
    import contextlib
    import io

    from mohico.launcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_environ = os.getcwd(), dict(os.environ)
    os.chdir(cwd)
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:                 # argparse and the commands' exits
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old_cwd)
        # the whole environment back as it was: W&B puts its service's address in WANDB_SERVICE, and a
        # later subprocess that inherited it would log through this process's service, whose writes
        # can land after that subprocess has exited (its .wandb file read too early)
        os.environ.clear()
        os.environ.update(old_environ)
    return subprocess.CompletedProcess(["mohico", *argv], code, out.getvalue(), err.getvalue())
