"""`mohico` commands run by the CLI's ``main`` inside the test process (tests that check a command's
exit code and output, where a fresh interpreter per command would only add its imports)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def run_cli_in_process(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``mohico ARGV`` run by the CLI's ``main`` in this process, from ``cwd`` with ``env`` added to the
    environment (both restored after): exit code, stdout and stderr as a CompletedProcess. Saves the
    ~3-4 s a fresh interpreter spends importing torch for each command."""
    import contextlib
    import io

    from mohico.launcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in env}
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
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["mohico", *argv], code, out.getvalue(), err.getvalue())
