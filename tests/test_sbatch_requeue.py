"""slurm/pretrain.sbatch's requeue decision, run with a fake `srun` and `scontrol` on PATH: exit 3
(checkpointed after the signal) and exit 6 (the signal arrived while the ranks were blocked, so
they exited unsaved; the last published checkpoint is intact) requeue the job once; any other code
fails it. The real-SLURM path is tests/test_slurm.py."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
