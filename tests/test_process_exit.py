"""mohico.launcher.process_exit: a finished rank exits after the Python part of the interpreter's
exit (non-daemon threads joined, atexit hooks run, stdio flushed) and without the module teardown."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading
    from pathlib import Path
    from mohico.launcher.process_exit import exit_process

    out = Path(sys.argv[1])

    class TornDown:                       # a module global: its __del__ runs in the module teardown only
        def __del__(self):
            (out / "teardown").write_text("x")

    keep = TornDown()
    go = threading.Event()
    threading.Thread(target=lambda: go.wait() and (out / "thread").write_text("x")).start()   # non-daemon
    atexit.register(lambda: (out / "atexit").write_text("x"))
    print("buffered", end="")             # stdout is a pipe: block-buffered, not yet written
    go.set()
    {exit}
""")


@pytest.mark.parametrize("how", ["exit_process(7)", "sys.exit(7)"])
def test_exit_process_runs_the_python_exit_and_skips_the_teardown(tmp_path, how):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(exit=how))
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 7, res.stderr
    assert res.stdout == "buffered" and res.stderr == ""
    assert (tmp_path / "thread").exists() and (tmp_path / "atexit").exists()
    # the interpreter's own exit tears the module down (the control); exit_process does not
    assert (tmp_path / "teardown").exists() == (how == "sys.exit(7)")
