"""slurm/pretrain.sbatch's requeue decision, run with a fake `srun` and `scontrol` on PATH: exit 3
(checkpointed after the signal) and exit 6 (the signal arrived while the ranks were blocked, so
they exited unsaved; the last published checkpoint is intact) requeue the job once; any other code
fails it. The real-SLURM path is tests/test_slurm.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_job_scripts_exit_codes_are_the_tables():
    """The script names its codes once, at the top, as mohico.errors.ExitCode does; every ``exit``
    and ``-eq`` of it goes through those names (only ``exit 0`` and srun's own code are literal)."""
    import re

    from mohico.errors import ExitCode

    text = (ROOT / "slurm" / "pretrain.sbatch").read_text()
    named = dict(re.findall(r"^([A-Z_]+)=(\d+)\s+#", text, flags=re.M))
    assert named and {k: int(v) for k, v in named.items()} == {k: ExitCode[k].value for k in named}, named
    assert {"PREEMPTED", "SIGNALLED_UNSAVED"} <= set(named)
    code_lines = [line.split("#")[0] for line in text.splitlines() if not line.lstrip().startswith("#")]
    literal = [line for line in code_lines if re.search(r"\bexit\s+[1-9]|-eq\s+[0-9]|exited [0-9]", line)]
    assert not literal, literal


@pytest.mark.parametrize("code,requeued", [(0, False), (1, False), (3, True), (4, False), (5, False), (6, True)])
def test_job_script_requeues_after_a_signal_whether_or_not_the_ranks_saved(tmp_path, code, requeued):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> {calls}\nexit {code}\n')
    (bindir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {calls}\nexit 0\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "n1", "MOHICO_WORKDIR": str(tmp_path)}
    res = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sbatch"), "cfg.yaml"], env=env,
                         capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("srun ") and lines[0].endswith("-m mohico train cfg.yaml"), lines
    assert (lines[1:] == ["scontrol requeue 42"]) == requeued, lines
    assert res.returncode == (0 if requeued else code), res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_signalled_while_hung_exit_6_and_the_job_is_requeued(tmp_path):
    """Issue 30 item 1: a pre-empted 2-rank job that could not save reaches the script's requeue as 6
    (not as torchrun's 1). `srun` here runs the real launcher (`spawn_local`, torchrun) over the
    real CLI and training loop around the fake module and loader; SIGTERM reaches it while rank 0
    hangs in its loader and rank 1 in a collective."""
    import signal

    from tests.test_failure_spawn import SPAWN, fake_cli_args, wait_for

    bindir, calls, pidfile, stalled = tmp_path / "bin", tmp_path / "calls", tmp_path / "srun.pid", tmp_path / "stalled"
    bindir.mkdir()
    args = " ".join(f"'{a}'" for a in fake_cli_args(tmp_path / "run", "trainer.max_steps=40",
                                                     "trainer.stall_timeout_s=300", "trainer.signal_grace_s=3")[:2])
    (bindir / "srun").write_text(
        f'#!/bin/bash\necho "srun $*" >> {calls}\n'
        f'while [ "$1" != "-m" ]; do shift; done; shift 2\n'          # drop srun's options, python, "-m mohico"; keep "train ..."
        f'echo $$ > {pidfile}\nexec "{sys.executable}" -c "{SPAWN}" {args} "$@"\n')
    (bindir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {calls}\nexit 0\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n1",
           "MOHICO_WORKDIR": str(ROOT), "MOHICO_PYTHON": sys.executable,
           "FAKE_STALL_AT": "3", "FAKE_STALL_RANK": "0", "FAKE_STALL_FILE": str(stalled)}
    rest = fake_cli_args(tmp_path / "run", "trainer.max_steps=40", "trainer.stall_timeout_s=300",
                         "trainer.signal_grace_s=3")[3:]                  # CONFIG and the overrides
    with open(tmp_path / "job.out", "w") as out:
        job = subprocess.Popen(["bash", str(ROOT / "slurm" / "pretrain.sbatch"), *rest], env=env,
                               stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(stalled, job)
            os.kill(int(pidfile.read_text()), signal.SIGTERM)     # the pre-empting scheduler, to the launcher
            code = job.wait(timeout=240)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    text = (tmp_path / "job.out").read_text()
    assert calls.read_text().splitlines()[1:] == ["scontrol requeue 42"], text[-4000:]
    assert code == 0 and "srun exited 6" in text, text[-4000:]
    assert "exit code 6: rank" in text and "signal_grace_s=3" in text, text[-4000:]
