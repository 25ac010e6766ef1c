"""Preemption: SIGUSR1 / SIGTERM set a flag; the ranks agree on it at a step boundary.

    pre = Preemption().install()
    ...
    if pre.agreed():            # every rank calls it at the same step (one all-reduce)
        save checkpoint; pre.requeue(rank); return PREEMPTED_EXIT_CODE

SLURM sends SIGUSR1 ahead of the time limit (``#SBATCH --signal=USR1@120``) and SIGTERM on
``scancel``/preemption; a signal reaching any one rank stops all of them at the same step.
Under SLURM (``SLURM_JOB_ID`` set) rank 0 requeues the job with ``scontrol requeue``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess

import torch

from mohico import dist
from mohico.errors import ExitCode

log = logging.getLogger("mohico.trainer")

PREEMPTED_EXIT_CODE = ExitCode.PREEMPTED.value     # "checkpointed after a preemption signal; requeue me"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Signal flag + cross-rank agreement. ``state_dict`` is not needed: a resumed run starts clear."""

    def __init__(self):
        self.flag = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):  # noqa: ARG002 - signal API
        self.flag = True
        self.signum = signum

    def install(self) -> "Preemption":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def agreed(self, device: str | torch.device = "cpu") -> bool:
        """True on every rank if any rank got a signal (a MAX all-reduce of the flag)."""
        return dist.any_rank(bool(self.flag), device)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a peer rank's signal"


def requeue(rank: int) -> bool:
    """Under SLURM, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``; returns True if it did.

    When the job script requeues itself after srun returns (``slurm/pretrain.sbatch`` exports
    ``MOHICO_REQUEUE_BY=sbatch``), the trainer leaves it to the script: requeueing from inside
    a rank would cancel the job step while the other ranks are still exiting.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if rank != 0 or not job:
        return False
    if os.environ.get("MOHICO_REQUEUE_BY") == "sbatch":
        log.info("SLURM job %s: the job script requeues it once every rank has exited", job)
        return False
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("scontrol requeue %s failed: %s (resubmit the job by hand; it resumes from 'latest')", job, e)
        return False
    if out.returncode != 0:
        log.warning("scontrol requeue %s failed (exit %d): %s (was the job submitted with --requeue?)",
                    job, out.returncode, out.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
