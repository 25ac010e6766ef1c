"""Where this process sits in a distributed job, read from its environment (bottom floor).

    env = detect_env()                # DistEnv(launcher, rank, world_size, local_rank, ...)
    export_env(env)                   # RANK, WORLD_SIZE, ... into os.environ (torch, DeepSpeed read them)

:func:`mohico.dist.init` starts the process group from it.

:func:`detect_env` maps the environment to a :class:`DistEnv`, in this order:

1. **A launcher** (torchrun, the deepspeed launcher, or anything following the ``env://``
   convention): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
   are all set. torchrun is recognised by ``TORCHELASTIC_RUN_ID``, the deepspeed launcher by
   ``CROSS_RANK``/``LOCAL_SIZE``; both win over SLURM (torchrun started by srun).
2. **A SLURM task started by srun** (``SLURM_PROCID`` and ``SLURM_STEP_ID`` set): rank =
   ``SLURM_PROCID``, world = ``SLURM_NTASKS``, local rank = ``SLURM_LOCALID``, node rank =
   ``SLURM_NODEID``; the master is the first node of ``SLURM_STEP_NODELIST`` (else
   ``SLURM_JOB_NODELIST``), expanded with ``scontrol show hostnames`` and resolved with
   ``scontrol show node NAME -o`` (``NodeAddr=``; node names need not resolve in DNS); the
   port is ``20000 + SLURM_JOB_ID % 20000``. ``MASTER_ADDR``/``MASTER_PORT``, if exported,
   override both. A batch script's own shell (no srun) counts as a world of 1 when the job
   has 1 task, and is an error otherwise.
3. **A plain process**: world of 1 on ``127.0.0.1`` and a free port (or ``MASTER_ADDR`` /
   ``MASTER_PORT`` if exported).

An inconsistent environment (a rank outside the world, half of the launcher variables,
``SLURM_NTASKS`` disagreeing with the tasks per node) raises :class:`MohicoError` naming the
variables.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

from mohico.errors import MohicoError

Launcher = Literal["plain", "torchrun", "deepspeed", "slurm"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def as_environ(self) -> dict[str, str]:
        """The ``env://`` variables torch.distributed and DeepSpeed read."""
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            "GROUP_RANK": str(self.node_rank),
        }


# --------------------------------------------------------------------------- detection
def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the process environment (default ``os.environ``) into a :class:`DistEnv`."""
    env = dict(os.environ if environ is None else environ)
    set_launcher = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v in env]
    if set_launcher:
        return _from_launcher(env)
    if "SLURM_PROCID" in env:
        return _from_slurm(env)
    return _plain(env)


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw.strip())
    except ValueError:
        raise MohicoError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise MohicoError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _port(env: Mapping[str, str], name: str = "MASTER_PORT") -> int:
    port = _int(env, name, minimum=1)
    if port > 65535:
        raise MohicoError(f"environment variable {name}={port} is not a TCP port (1-65535)")
    return port


def _check_rank(rank: int, world: int, rank_var: str, world_var: str) -> None:
    if rank >= world:
        raise MohicoError(f"inconsistent environment: {rank_var}={rank} but {world_var}={world} "
                          f"(it must lie in 0..{world - 1})")


def _from_launcher(env: dict) -> DistEnv:
    missing = [v for v in LAUNCHER_VARS if not env.get(v)]
    if missing:
        have = ", ".join(f"{v}={env[v]}" for v in LAUNCHER_VARS if env.get(v))
        raise MohicoError(
            f"half-set launcher environment: {have} but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing; a launcher (torchrun, deepspeed) sets all of "
            f"{', '.join(LAUNCHER_VARS)}. Unset them to run as a single plain process, or start the "
            f"job with torchrun / srun")
    rank = _int(env, "RANK")
    world = _int(env, "WORLD_SIZE", minimum=1)
    local_rank = _int(env, "LOCAL_RANK")
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    _check_rank(local_rank, world, "LOCAL_RANK", "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env:
        launcher: Launcher = "torchrun"
        lws_var, node_var = "LOCAL_WORLD_SIZE", "GROUP_RANK"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
        lws_var, node_var = "LOCAL_SIZE", "CROSS_RANK"
    else:
        launcher = "torchrun"
        lws_var, node_var = "LOCAL_WORLD_SIZE", "GROUP_RANK"
    local_world = _int(env, lws_var, minimum=1) if env.get(lws_var) else None
    if local_world is None:       # a bare env:// launch without it: assume one node
        local_world = world
    _check_rank(local_rank, local_world, "LOCAL_RANK", lws_var)
    if local_world > world:
        raise MohicoError(f"{lws_var}={local_world} exceeds WORLD_SIZE={world}")
    node_rank = _int(env, node_var) if env.get(node_var) else rank // local_world
    return DistEnv(launcher, rank, world, local_rank, local_world, env["MASTER_ADDR"], _port(env), node_rank)


def _plain(env: dict) -> DistEnv:
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    port = _port(env) if env.get("MASTER_PORT") else free_port(addr)
    return DistEnv("plain", 0, 1, 0, 1, addr, port, 0)


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr if addr not in ("localhost",) else "127.0.0.1", 0))
        return s.getsockname()[1]


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's ``SLURM_TASKS_PER_NODE`` syntax: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise MohicoError(f"cannot parse the SLURM tasks-per-node list {spec!r} (expected e.g. '2(x3),1')")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _from_slurm(env: dict) -> DistEnv:
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    ntasks_var = "SLURM_NPROCS" if "SLURM_NPROCS" in env and "SLURM_NTASKS" not in env else "SLURM_NTASKS"
    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
    required = {"SLURM_PROCID": env.get("SLURM_PROCID"), ntasks_var: env.get(ntasks_var),
                "SLURM_LOCALID": env.get("SLURM_LOCALID"), "SLURM_NODEID": env.get("SLURM_NODEID"),
                "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": env.get(nodelist_var) if nodelist_var else None}
    missing = [k for k, v in required.items() if not v]
    if missing:
        raise MohicoError(f"half-set SLURM environment: SLURM_PROCID is set but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} missing; start the ranks with srun "
                          f"(or unset SLURM_PROCID to run as a plain process)")
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, ntasks_var, minimum=1)
    local_rank = _int(env, "SLURM_LOCALID")
    node_rank = _int(env, "SLURM_NODEID")
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if not in_step and world > 1:
        raise MohicoError(
            f"this process runs in the batch script of SLURM job {job} ({ntasks_var}={world}) but was not "
            f"started by srun, so it would wait for {world - 1} ranks that never start: launch it with "
            f"`srun python -m mohico train ...` (slurm/pretrain.sbatch does)")
    _check_rank(rank, world, "SLURM_PROCID", ntasks_var)
    if in_step and env.get("SLURM_STEP_NUM_TASKS") and _int(env, "SLURM_STEP_NUM_TASKS", 1) != world:
        raise MohicoError(f"SLURM_NTASKS mismatch: {ntasks_var}={world} but SLURM_STEP_NUM_TASKS="
                          f"{env['SLURM_STEP_NUM_TASKS']}; do not override SLURM_NTASKS for the srun step")
    tpn_var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)), None)
    if tpn_var and in_step:
        per_node = parse_tasks_per_node(env[tpn_var])
        if sum(per_node) != world:
            raise MohicoError(f"SLURM_NTASKS mismatch: {ntasks_var}={world} but {tpn_var}={env[tpn_var]} "
                              f"adds up to {sum(per_node)} tasks")
        if node_rank >= len(per_node):
            raise MohicoError(f"SLURM_NODEID={node_rank} is outside the step's {len(per_node)} nodes ({tpn_var}={env[tpn_var]})")
        local_world = per_node[node_rank]
    else:
        local_world = world if not in_step else (local_rank + 1)
    _check_rank(local_rank, local_world, "SLURM_LOCALID", f"{tpn_var or 'the tasks on this node'}")
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        addr = slurm_master_addr(env[nodelist_var], path=env.get("PATH"))
    port = _port(env) if env.get("MASTER_PORT") else slurm_port(job)
    return DistEnv("slurm", rank, world, local_rank, local_world, addr, port, node_rank)


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port of a SLURM job: 20000 + job id % 20000 (same on every rank and requeue)."""
    try:
        jid = int(str(job_id).split("_")[0])
    except ValueError:
        raise MohicoError(f"SLURM_JOB_ID={job_id!r} is not a job number") from None
    return SLURM_PORT_BASE + jid % SLURM_PORT_RANGE


def _scontrol(args: list[str], path: Optional[str]) -> str:
    exe = shutil.which("scontrol", path=path)
    if exe is None:
        raise MohicoError("scontrol is not on PATH, so the SLURM master node cannot be resolved: "
                          "add SLURM's bin folder to PATH or export MASTER_ADDR")
    try:
        res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise MohicoError(f"`scontrol {' '.join(args)}` did not answer within 60 s") from None
    if res.returncode != 0:
        raise MohicoError(f"`scontrol {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def slurm_master_addr(nodelist: str, path: Optional[str] = None) -> str:
    """Address of the first node of a SLURM node list (``n[1-2]`` -> n1 -> its ``NodeAddr``)."""
    hosts = _scontrol(["show", "hostnames", nodelist], path).split()
    if not hosts:
        raise MohicoError(f"`scontrol show hostnames {nodelist}` returned no node")
    first = hosts[0]
    info = _scontrol(["show", "node", first, "-o"], path)
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", info)
    if not m or m.group(1) in ("(null)", ""):
        return first          # no NodeAddr reported: the node name is its address
    return m.group(1)


def export_env(env: DistEnv) -> None:
    """Write the ``env://`` variables into ``os.environ`` (DeepSpeed and torch read them)."""
    os.environ.update(env.as_environ())
