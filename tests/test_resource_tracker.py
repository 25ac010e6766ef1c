"""The multiprocessing resource tracker outlives SLURM's preemption signal.

SLURM's ``--signal=USR1@N`` and ``scancel --signal=USR1`` reach every process of the job step.
The loader's forkserver and workers ignore USR1, but Python's resource tracker (the process that
holds the names of the loader queues' semaphores) only ignores SIGINT and SIGTERM: it died of
USR1, the rank relaunched an empty one at exit, and each semaphore's unregister then printed a
``resource_tracker.py ... cache[rtype].remove(name) KeyError: '/mp-...'`` traceback (about 20 at
the end of every preempted SLURM job log; a rank killed later would also leak the semaphores).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = """
import os, signal, sys, time
from multiprocessing import resource_tracker
from mohico.datasets.load.pipeline import build_loader
from tests.test_pipeline import small_cfg

got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))      # the trainer's preemption handler
loader = build_loader(small_cfg(num_workers=2), sys.argv[1])
it = iter(loader)
next(it)
tracker = resource_tracker._resource_tracker._pid
os.killpg(0, signal.SIGUSR1)       # like SLURM: every process of the step (tracker, forkserver, workers)
time.sleep(1.0)
for _ in range(3):
    next(it)
try:
    os.kill(tracker, 0)
    alive = open(f"/proc/{tracker}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
except ProcessLookupError:
    alive = False
print(f"got {got} tracker {tracker} alive {alive}", flush=True)
loader.close()
"""


@pytest.mark.slow          # ~45 s on 2 loaded cores: a fresh interpreter, its forkserver and two workers
def test_usr1_to_every_process_leaves_the_resource_tracker_alive_and_stderr_clean(synth_shards):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", RANK, str(synth_shards)], capture_output=True, text=True,
                         timeout=180, cwd=ROOT, env=env, start_new_session=True)   # its own process group
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"got [{int(signal.SIGUSR1)}]" in res.stdout and "alive True" in res.stdout, (res.stdout, res.stderr[-3000:])
    for needle in ("resource_tracker", "KeyError", "Traceback", "leaked"):
        assert needle not in res.stderr, res.stderr[-3000:]
