"""The process's random-number streams (Python, NumPy, torch CPU, this rank's CUDA device) as
one resumable state.

    seed_everything(seed)                       # every stream from one seed
    rng = RngState(seed, rank)                  # checkpointed per rank (trainer.states)
    rng.state_dict() / rng.load_state_dict(sd)  # exact resume at the same world size
    rng.reshard(old_rank_states, step)          # another world size: fresh step-dependent streams
    with preserved_rng(): ...                   # code that must not move the training streams
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Per-rank seed (fixed for a fresh run; mixed with the step after a world-size change)."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % 2 ** 63


def rng_state(cuda: bool = True) -> dict:
    """Python, NumPy and torch CPU generator states of this process, plus (``cuda=True``) the
    CUDA generator of this rank's current device only: reading every device's would create a
    CUDA context on each GPU of the node from every rank."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()   # as a tensor: loads with weights_only
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run the body, then put the CPU streams back where they were (e.g. an evaluation that
    must leave the training trajectory bitwise unchanged)."""
    saved = rng_state(cuda=False)
    try:
        yield
    finally:
        set_rng_state(saved)


class RngState:
    """The random streams of rank ``rank`` as a checkpointable state (``states["rng"]``)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = int(seed), int(rank)

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)

    def reshard(self, states: list[dict], step: int) -> None:
        """Another world size: the old ranks' streams do not map to the new ranks, so every rank
        restarts its streams from a seed of ``(seed, rank, step)`` (not bitwise-continuous)."""
        seed_everything(rank_seed(self.seed, self.rank, step))
