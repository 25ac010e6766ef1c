"""`mohico train --nproc 2` reports the root cause (issue 30 item 1): the exit code and one line
of the rank that stopped first, not the "a peer stopped" 1 of the rank that followed it nor
torchrun's own 1. The real launcher (torchrun), CLI and training loop run around the fake
module and loader of tests/_fake_train.py (tests/_fake_cli_rank.py), so each case takes seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._fake_train import BASE

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "_fake_cli_rank.py"
CONFIG = ROOT / "mohico" / "configs" / "base.yaml"
SPAWN = "import sys; from mohico.launcher.spawn import spawn_local; sys.exit(spawn_local(2, sys.argv[1:]))"


def fake_cli_args(run_dir: Path, *overrides: str) -> list[str]:
    """What follows ``mohico`` for a fake training of 2 ranks: ``--script HELPER train CONFIG ...``."""
    return ["--script", str(HELPER), "train", str(CONFIG), *BASE, f"run.dir={run_dir}", *overrides]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:g} s"
        time.sleep(0.1)


def run_spawn(tmp_path: Path, overrides, env, signal_after: Path | None = None, timeout: float = 240,
              spawn: str = SPAWN):
    """``spawn_local(2, ...)`` in a subprocess (output to a file: an orphan must not hold a pipe);
    with ``signal_after``, SIGTERM the launcher once that file exists. Returns (code, output)."""
    out = tmp_path / "spawn.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", spawn, *fake_cli_args(tmp_path / "run", *overrides)],
                                cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
        try:
            if signal_after is not None:
                wait_for(signal_after, proc)
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, out.read_text()


def summary(output: str) -> str:
    return next((x for x in output.splitlines() if x.startswith("[mohico spawn] 2 ranks finished")), "")


def test_preemption_of_two_ranks_exits_3(tmp_path):
    code, output = run_spawn(tmp_path, ["trainer.max_steps=40"], {"FAKE_SIGNAL_AT": "3", "FAKE_SIGNAL_RANK": "1"})
    assert code == 3, output[-4000:]
    assert "rank 0: 3" in summary(output) and "rank 1: 3" in summary(output), output[-4000:]


def test_nonfinite_loss_on_two_ranks_exits_4_with_the_line_printed_once_without_torchruns_report(tmp_path):
    code, output = run_spawn(tmp_path, ["trainer.max_steps=12", "trainer.nonfinite_limit=3"],
                             {"FAKE_NAN_AT": "4", "FAKE_NAN_RANK": "1"})
    line = summary(output)
    assert code == 4, output[-4000:]
    assert "exit code 4" in line and "stopped at step 6" in line, line
    # issue 28 item 1: the error once (the launcher's line), not once per rank; no torchrun report
    assert output.count("the loss was NaN/inf for 3 micro-steps in a row") == 1, output[-4000:]
    for noise in ("Traceback", "ChildFailedError", "closing signal", "failed (exitcode"):
        assert noise not in output, output[-4000:]
    # the ranks' log files keep their error
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("train_rank*.log"))
    assert "the loss was NaN/inf for 3 micro-steps in a row" in logs


def test_debug_shows_the_ranks_tracebacks_and_keeps_the_exit_code(tmp_path):
    """`mohico --debug train --nproc 2`: the rank's traceback and torchrun's report are shown."""
    code, output = run_spawn(tmp_path, ["trainer.max_steps=12", "trainer.nonfinite_limit=3"],
                             {"FAKE_NAN_AT": "4", "FAKE_NAN_RANK": "1"},
                             spawn=SPAWN.replace("sys.argv[1:])", "sys.argv[1:], debug=True)"))
    assert code == 4, output[-4000:]
    assert "Traceback" in output and "NonFiniteError: stopped at step 6" in output, output[-4000:]
    assert "exit code 4" in summary(output)


def test_stall_on_one_of_two_ranks_exits_5_naming_it_not_the_peer_that_followed(tmp_path):
    code, output = run_spawn(tmp_path, ["trainer.max_steps=40", "trainer.stall_timeout_s=8"],
                             {"FAKE_STALL_AT": "3", "FAKE_STALL_RANK": "1"})
    line = summary(output)
    assert code == 5, output[-4000:]
    assert "exit code 5" in line and "rank 1 stopped first (exit 5): stalled: no progress" in line, line
    assert output.count("stalled: no progress") == 1, output[-4000:]     # the launcher's line only


def test_signal_while_two_ranks_hang_exits_6_naming_the_grace_period(tmp_path):
    stalled = tmp_path / "stalled"
    code, output = run_spawn(tmp_path, ["trainer.max_steps=40", "trainer.stall_timeout_s=300",
                                        "trainer.signal_grace_s=3"],
                             {"FAKE_STALL_AT": "3", "FAKE_STALL_RANK": "0", "FAKE_STALL_FILE": str(stalled)},
                             signal_after=stalled)
    line = summary(output)
    assert code == 6, output[-4000:]
    assert "exit code 6" in line and "did not reach a step boundary within trainer.signal_grace_s=3" in line, line
    assert "rank 0: 6" in line, line
