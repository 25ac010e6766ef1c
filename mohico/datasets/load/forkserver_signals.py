"""Imported only by the loader's forkserver (as a preload module), never by a rank.

SLURM's ``--signal=USR1@N``, ``scancel --signal`` and preemption's SIGTERM reach every process of
the job step: the rank, its loader's forkserver and the workers it forks. Preemption is the rank's
job (agree, save, exit 3), so the forkserver and its workers ignore SIGUSR1 and SIGTERM (workers
inherit the dispositions across the fork, so they ignore them from their first instruction on)
instead of dying mid-batch. The rank starts the forkserver with these signals blocked
(`loader_workers.start_forkserver`): one arriving before this preload runs stays pending, and is
discarded here before they are unblocked. The forkserver and workers still end with the rank: the
rank shuts them down, and a worker's exit-with-rank thread ends both once the rank is gone.
"""
from mohico.datasets.load.loader_workers import ignore_preemption_signals

ignore_preemption_signals()
