"""Imported only by the loader's forkserver (as a preload module), never by a rank.

SLURM's ``--signal=USR1@N``, ``scancel --signal`` and preemption's SIGTERM reach every process of
the job step: the rank, its loader's forkserver and the workers it forks. Preemption is the rank's
job (agree, save, exit 3), so the forkserver and its workers ignore SIGUSR1 and SIGTERM (workers
inherit the dispositions across the fork) instead of dying mid-batch. They still end with the rank:
the rank shuts them down, and a worker's exit-with-rank thread ends both once the rank is gone.
"""
import signal

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

for _sig in PREEMPTION_SIGNALS:
    signal.signal(_sig, signal.SIG_IGN)
