"""The process group and the few collectives mohico uses (bottom floor: stdlib, torch, mohico.errors).

    env = init(timeout_s=600)           # detect the environment (mohico.dist_env), start the group
    rank(), world(), is_distributed()   # 0, 1, False without a process group
    if any_rank(saw_nan): ...           # the same answer on every rank
    parts = all_gather_object(stats)    # [rank 0's, rank 1's, ...]
    shutdown()

Every function works the same in a single process without a process group (a world of one):
collectives then return their input, so callers never ask "am I distributed?" themselves.
``group=None`` is the default group. Every collective must be called by every rank of the group,
in the same order.
"""
from __future__ import annotations

import importlib
import logging
import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as tdist

from mohico.dist_env import DistEnv, detect_env, export_env
from mohico.errors import MohicoError

log = logging.getLogger("mohico.dist")

_REDUCE_OPS = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}


# --------------------------------------------------------------------------- where am I
def is_initialized() -> bool:
    """A default process group exists (it may have one rank)."""
    return tdist.is_available() and tdist.is_initialized()


def rank_world(group=None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``, or ``(0, 1)`` without a process group."""
    if is_initialized():
        return tdist.get_rank(group), tdist.get_world_size(group)
    return 0, 1


def rank(group=None) -> int:
    return rank_world(group)[0]


def world(group=None) -> int:
    return rank_world(group)[1]


def is_distributed(group=None) -> bool:
    """More than one rank: collectives really communicate."""
    return world(group) > 1


# --------------------------------------------------------------------------- start and stop
def disable_deepspeed_shm_op() -> None:
    """Stop DeepSpeed from JIT-building its CPU shared-memory all-reduce op."""
    # DeepSpeed's CPU shared-memory all-reduce op (deepspeed_shm_comm, used only for inference)
    # is a ~45 s JIT build; `import deepspeed.comm.torch as m` binds torch, not the module.

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init(backend: Optional[str] = None, env: Optional[DistEnv] = None,
         timeout_s: Optional[float] = None) -> DistEnv:
    """Detect the environment (:func:`mohico.dist_env.detect_env`), export it, pick the backend
    and start the process group through DeepSpeed (whose engine then shares it).

    ``backend=None`` picks ``nccl`` with a GPU and ``gloo`` without. With a GPU the CUDA device
    is set from the local rank first. ``timeout_s`` bounds every collective. A second call in
    the same process returns the environment without re-initialising (and raises if the
    existing group disagrees with it).
    """
    env = env or detect_env()
    export_env(env)
    gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    if backend is None:
        backend = "nccl" if gpu else "gloo"
    if gpu:
        n = torch.cuda.device_count()
        if n == 1:
            device = 0
        elif env.local_rank < n:
            device = env.local_rank
        else:
            raise MohicoError(f"LOCAL_RANK={env.local_rank} but this node shows {n} GPUs "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                              f"run at most {n} tasks per node (one per GPU)")
        torch.cuda.set_device(device)
    if is_initialized():
        if tdist.get_world_size() != env.world_size or tdist.get_rank() != env.rank:
            raise MohicoError(f"a process group already exists with rank {tdist.get_rank()}/{tdist.get_world_size()}, "
                              f"but the environment says {env.rank}/{env.world_size}")
        return env
    disable_deepspeed_shm_op()
    import deepspeed

    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   rank=env.rank, world_size=env.world_size, **kwargs)
    except Exception as e:  # noqa: BLE001 - rendezvous failures come in many types
        raise MohicoError(f"could not start the {backend} process group as rank {env.rank}/{env.world_size} "
                          f"({env.launcher}) with master {env.master_addr}:{env.master_port}: {e}") from e
    return env


def shutdown() -> None:
    """Destroy the default process group if one exists (avoids a rare abort at interpreter exit).
    A failure to destroy it (a peer already gone) is logged, not raised: the job is ending."""
    if not is_initialized():
        return
    try:
        tdist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        log.warning("destroying the process group failed (%s: %s)", type(e).__name__, e)


# --------------------------------------------------------------------------- collectives
def barrier(group=None) -> None:
    """Wait until every rank of ``group`` got here (nothing to wait for with one rank)."""
    if is_distributed(group):
        tdist.barrier(group=group)


def all_reduce_(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce ``t`` in place over the ranks (``op``: sum, max or min) and return it."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce_: op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    if is_distributed(group):
        tdist.all_reduce(t, op=_REDUCE_OPS[op], group=group)
    return t


def any_rank(flag: bool, device: str | torch.device = "cpu", group=None) -> bool:
    """True on every rank if ``flag`` is true on any rank ("did any rank see X?"). ``device``:
    where the one-element tensor lives (the backend's device: CUDA for NCCL). One rank: ``flag``
    itself, without a tensor (it is asked every step)."""
    if not is_distributed(group):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(all_reduce_(t, "max", group).item())


def all_gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x: (n, ...)`` concatenated in rank order -> ``(n * W, ...)``; no autograd
    (the result does not depend on ``x`` for gradients). Every rank must give the same shape.
    Returns ``x`` itself with one rank."""
    if not is_distributed(group):
        return x
    parts = [torch.empty_like(x) for _ in range(world(group))]
    tdist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, 0)


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` with one rank)."""
    if not is_distributed(group):
        return [obj]
    parts: list = [None] * world(group)
    tdist.all_gather_object(parts, obj, group=group)
    return parts


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (the others' ``obj`` is ignored)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=group)
    return box[0]
