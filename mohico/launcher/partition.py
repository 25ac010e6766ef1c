"""How many CPU cores a SLURM partition's nodes have, so a job never asks for more than exists.

``--cpus-per-task`` (``slurm.cpus_per_task``) 0, the default, means "what the partition offers":
the smallest node's cores divided by the tasks per node. An explicit value that no node of the
partition can hold fails at submit time (a job asking for more cores than a node has stays
PENDING forever). Without an answering ``sinfo`` (a dry run away from the cluster, or a
controller that is down: a warning says so) nothing is checked and an
automatic value leaves ``--cpus-per-task`` out of the script (SLURM's default, 1).
"""
from __future__ import annotations

import shutil
import subprocess
import sys

from mohico.errors import MohicoError, UsageError


def node_cpus(partition: str, sinfo_exe: str = "sinfo") -> list[int] | None:
    """CPU counts of the partition's nodes (the cluster's default partition when ``partition`` is
    empty), or ``None`` without an answering ``sinfo`` (a warning says why: nothing is checked then).
    Raises :class:`UsageError` for an unknown partition."""
    exe = shutil.which(sinfo_exe)
    if exe is None:
        return None
    try:
        return _query(exe, partition)
    except MohicoError as e:
        if isinstance(e, UsageError):
            raise
        print(f"mohico submit: warning: {e}; --cpus-per-task is not checked against the partition", file=sys.stderr)
        return None


def _query(exe: str, partition: str) -> list[int]:
    cmd = [exe, "--noheader", "--format=%P %c"] + ([f"--partition={partition}"] if partition else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise MohicoError("sinfo did not answer within 30 s (is slurmctld up?)") from None
    if res.returncode != 0:
        raise MohicoError(f"sinfo failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    cpus = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        name, count = parts
        if not partition and not name.endswith("*"):   # sinfo marks the default partition with '*'
            continue
        try:
            cpus.append(int(count.rstrip("+")))
        except ValueError:
            continue
    if not cpus:
        where = f"partition {partition!r}" if partition else "the default partition"
        raise UsageError(f"sinfo lists no nodes in {where}: check --partition (`sinfo -s` lists them)")
    return cpus


def resolve_cpus_per_task(opts, sinfo_exe: str = "sinfo") -> None:
    """Set ``opts.cpus_per_task`` from the partition when it is 0; fail fast when no node can
    hold ``cpus_per_task x tasks per node`` cores. (``opts``: a ``SubmitOptions``.)"""
    tasks = opts.tasks_per_node or opts.gpus_per_node
    cpus = node_cpus(opts.partition, sinfo_exe)
    if cpus is None or tasks < 1:
        return
    where = f"partition {opts.partition!r}" if opts.partition else "the default partition"
    if opts.cpus_per_task == 0:
        per_task = min(cpus) // tasks
        if per_task < 1:
            raise UsageError(f"{where}: its smallest nodes have {min(cpus)} CPUs, fewer than the {tasks} tasks per "
                             f"node; lower --gpus-per-node/--tasks-per-node or choose another --partition")
        opts.cpus_per_task = per_task
        return
    need = opts.cpus_per_task * tasks
    if need > max(cpus):
        fit = max(cpus) // tasks
        fix = f"use --cpus-per-task {fit} (or leave it out: what the partition offers)" if fit >= 1 else \
            "lower --gpus-per-node/--tasks-per-node"
        raise UsageError(f"--cpus-per-task {opts.cpus_per_task} x {tasks} tasks per node = {need} CPUs, but the "
                         f"nodes of {where} have at most {max(cpus)}: the job would stay PENDING forever; {fix}")
