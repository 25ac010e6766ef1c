"""A FIFO memory bank of L2-normalised keys, sharded across data-parallel ranks.

The bank holds ``size`` keys in total (K). With W data-parallel ranks, rank r stores K / W of
them and only ever enqueues its own keys; keys never leave their rank. Memory per GPU is
therefore constant as W grows (1M negatives at 64 GPUs is 16 384 keys per GPU).

The NCE denominator over the whole bank (docs/METHODS.md section 1.4, Eq. 10) is assembled as:

1. all-gather the queries, ``Q: (B*W, d)`` (cheap: queries are small, keys are not);
2. each rank computes the partial log-sum-exp of ``Q @ shard.T / tau`` with
   :func:`mohico.kernels.bank_lse` -> ``lse_r: (B*W,)``;
3. the partials are combined with a max all-reduce and a sum-exp all-reduce,
   ``lse = m + log(sum_r exp(lse_r - m))``, and each rank keeps its own queries' rows.

The positive logit ``q . k+ / tau`` is local to the query's rank, so the per-sample loss
``logaddexp(q.k+/tau, lse) - q.k+/tau`` is finished locally (no need to gather positives).

Backward (:class:`ShardedBankLSE`): the gradient of the global LSE of query j is
``sum_r exp(lse_r,j - lse_j) * d lse_r,j / d q_j``. Each rank all-gathers the upstream
gradients ``(B*W,)``, computes its shard's weighted contribution for all gathered queries
``(B*W, d)`` through the kernel's own backward, and the contributions are summed with an
all-reduce; each rank returns its own slice. (An all-reduce rather than a reduce-scatter: it
works on every backend, gloo included, and the tensor is only ``B*W x d``.)

Own video (issue 12): each slot also stores the int64 id of the video its key came from
(``ids``; -1 when unknown). :meth:`MemoryBank.nce` / :meth:`MemoryBank.logits_lse` given the
queries' ``ids: (B,)`` leave every bank entry of the query's own video out of the log-sum-exp
(on every rank's shard: the ids are all-gathered with the queries), so a query's own video is
never its negative. The ids are checkpointed and resharded with the keys. A checkpoint written
before ids existed (state version 1) loads with every id unknown (-1): those keys are never
masked until they are evicted, i.e. for ``size / global batch`` steps (a warning says so).

Until the bank is full only the filled slots count as negatives (``filled``, logged as the
bank fill). All ranks must call :meth:`MemoryBank.nce` / :meth:`MemoryBank.logits_lse` together
with the same batch size (they are collectives).

Checkpoints are per rank (:meth:`state_dict`); :meth:`MemoryBank.reshard` converts the list
of all ranks' states to a new world size, preserving the FIFO (age) order of the keys.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mohico.dist import all_gather_cat, all_reduce_, rank_world
from mohico.errors import MohicoError
from mohico.kernels import bank_lse, bank_nce

STATE_VERSION = 2          # 2: per-slot video ids; version 1 (keys only) still loads, ids unknown
UNKNOWN_ID = -1            # a slot whose video is unknown: never masked
log = logging.getLogger("mohico.bank")


def _partial_lse(q: torch.Tensor, keys: torch.Tensor, tau: float, impl: Optional[str],
                 q_ids: Optional[torch.Tensor] = None, key_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log-sum-exp of ``q @ keys.T / tau`` per row (the kernel), own-video keys left out when
    ``q_ids``/``key_ids`` are given; ``-inf`` for an empty shard."""
    return bank_lse(q, keys, tau, impl=impl, q_ids=q_ids, bank_ids=key_ids)


class ShardedBankLSE(torch.autograd.Function):
    """Global log-sum-exp of ``q @ bank.T / tau`` over a bank sharded across ranks.

    ``q: (B, d)`` this rank's queries; ``keys: (n_r, d)`` this rank's filled shard (n_r may be
    0). Returns ``(B,)``: for each local query, the LSE over the keys of *all* ranks.
    ``q_ids: (B,)`` / ``key_ids: (n_r,)`` (both or neither): each query's own video is left out
    on every shard (the ids travel with the gathered queries).
    Differentiable w.r.t. ``q`` only. A collective: every rank of ``group`` must call it with
    the same ``B`` (and all with ids or all without).
    """

    @staticmethod
    def forward(ctx, q, keys, tau, group=None, impl=None, q_ids=None, key_ids=None):
        rank, world = rank_world(group)
        b = q.shape[0]
        gathered = all_gather_cat(q.detach(), group)                 # (B*W, d)
        gathered_ids = None if q_ids is None else all_gather_cat(q_ids, group)
        with torch.enable_grad():
            qg = gathered.detach().requires_grad_(True)
            lse_r = _partial_lse(qg, keys.detach(), tau, impl, gathered_ids, key_ids)  # (B*W,), graph kept
        part = lse_r.detach()
        if world > 1:
            m = all_reduce_(part.clone(), "max", group)
            m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            s = torch.exp(part - m_safe)
            all_reduce_(s, "sum", group)
            lse = m_safe + torch.log(s)                                 # -inf where every shard is empty
        else:
            lse = part.clone()
        ctx.graph = (qg, lse_r)
        ctx.group, ctx.rank, ctx.world, ctx.b = group, rank, world, b
        ctx.save_for_backward(part, lse)
        return lse[rank * b:(rank + 1) * b].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        part, lse = ctx.saved_tensors
        qg, lse_r = ctx.graph
        rank, world, b = ctx.rank, ctx.world, ctx.b
        g_all = all_gather_cat(grad.contiguous(), ctx.group)         # (B*W,)
        weight = torch.exp(part - lse)                                  # share of this shard in each row's LSE
        weight = torch.where(torch.isfinite(part) & torch.isfinite(lse), weight, torch.zeros_like(weight))
        contrib, = torch.autograd.grad(lse_r, qg, grad_outputs=g_all * weight, retain_graph=True,
                                       allow_unused=True)
        if contrib is None:
            contrib = torch.zeros_like(qg)
        if world > 1:
            contrib = all_reduce_(contrib.contiguous(), "sum", ctx.group)
        return contrib[rank * b:(rank + 1) * b].clone(), None, None, None, None, None, None


class MemoryBank:
    """FIFO queue of ``size`` L2-normalised keys of dimension ``dim``, sharded over ranks.

    Not an ``nn.Module`` on purpose: the bank is per-rank state that DeepSpeed must neither
    broadcast nor partition; it is saved per rank by the trainer.

    Attributes: ``keys: (size / W, dim)`` this rank's shard (a ring buffer), ``ids: (size / W,)``
    int64 the video id of each slot's key (-1: unknown), ``ptr`` the next slot to write, ``filled`` how many slots hold keys, ``shard_size``, ``rank``, ``world_size``.
    """

    def __init__(self, size: int, dim: int, group=None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, impl: Optional[str] = None):
        self.group = group
        self.rank, self.world_size = rank_world(group)
        if size <= 0 or dim <= 0:
            raise MohicoError(f"bank.size ({size}) and bank.dim ({dim}) must be > 0")
        if size % self.world_size:
            raise MohicoError(f"bank.size = {size} is not divisible by the data-parallel world size "
                              f"{self.world_size}: each rank holds bank.size / world_size keys; set bank.size "
                              f"to a multiple of {self.world_size} (e.g. {size - size % self.world_size or self.world_size})")
        self.size, self.dim, self.impl = size, dim, impl
        self.shard_size = size // self.world_size
        try:
            self.keys = torch.zeros(self.shard_size, dim, dtype=dtype, device=device)
            self.ids = torch.full((self.shard_size,), UNKNOWN_ID, dtype=torch.int64, device=device)
        except (RuntimeError, MemoryError) as e:   # CPU allocator or CUDA out of memory
            need = self.shard_size * (dim * torch.finfo(dtype).bits // 8 + 8)
            raise MohicoError(f"bank.size={size} x bank.dim={dim} needs {need / 2 ** 30:.1f} GiB per rank "
                              f"({self.world_size} rank(s)), which could not be allocated ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}). Lower bank.size "
                              f"(the papers use 65536-131072 keys); `mohico train --dry-run` shows the memory") from None
        self.ptr = 0
        self.filled = 0

    # ------------------------------------------------------------------ queue
    @property
    def fill(self) -> float:
        """Fraction of this rank's shard that holds keys (logged as the bank fill)."""
        return self.filled / self.shard_size

    def filled_keys(self) -> torch.Tensor:
        """The keys that count as negatives, ``(filled, dim)`` (slot order, not age order)."""
        return self.keys if self.filled == self.shard_size else self.keys[:self.filled]

    def filled_ids(self) -> torch.Tensor:
        """The video ids of :meth:`filled_keys`, ``(filled,)`` int64."""
        return self.ids if self.filled == self.shard_size else self.ids[:self.filled]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append this rank's ``keys: (n, dim)`` (L2-normalised here) and their videos' ``ids: (n,)``
        int64 (None: unknown, never masked), evicting the oldest.

        Out of place (``index_copy``, a new tensor): a loss computed against the bank before
        the enqueue keeps the keys it saw, so ``nce(); enqueue(); backward()`` is correct (MoCo
        clones its queue for the same reason).
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise MohicoError(f"MemoryBank.enqueue: keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        if ids is None:
            ids = torch.full((keys.shape[0],), UNKNOWN_ID, dtype=torch.int64, device=keys.device)
        if ids.shape != (keys.shape[0],) or ids.dtype != torch.int64:
            raise MohicoError(f"MemoryBank.enqueue: ids must be int64 ({keys.shape[0]},) video ids (one per key), "
                              f"got {ids.dtype} {tuple(ids.shape)}")
        if keys.device != self.keys.device:             # the bank follows the model's device
            self.keys = self.keys.to(keys.device)
        if self.ids.device != keys.device:
            self.ids = self.ids.to(keys.device)
        keys = F.normalize(keys.detach().to(self.keys.dtype), dim=1)
        n = keys.shape[0]
        skip = max(0, n - self.shard_size)           # more keys than slots: only the newest survive
        idx = (self.ptr + skip + torch.arange(n - skip, device=keys.device)) % self.shard_size
        self.keys = self.keys.index_copy(0, idx, keys[skip:])
        self.ids = self.ids.index_copy(0, idx, ids.to(keys.device)[skip:])
        self.ptr = (self.ptr + n) % self.shard_size
        self.filled = min(self.shard_size, self.filled + n)

    def ordered_keys(self) -> torch.Tensor:
        """This shard's keys oldest -> newest, ``(filled, dim)``."""
        if self.filled < self.shard_size:
            return self.keys[:self.filled]
        return torch.cat([self.keys[self.ptr:], self.keys[:self.ptr]], 0)

    # ------------------------------------------------------------------ losses
    def _bank_for(self, q: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                             torch.Tensor | None]:
        """(filled keys, their ids or None, the queries' ids on q's device or None)."""
        if self.keys.device != q.device:             # the bank follows the model's device
            self.keys = self.keys.to(q.device)
        if self.ids.device != q.device:
            self.ids = self.ids.to(q.device)
        if ids is None:
            return self.filled_keys(), None, None
        if ids.shape != (q.shape[0],) or ids.dtype != torch.int64:
            raise MohicoError(f"MemoryBank: query ids must be int64 ({q.shape[0]},) video ids (batch['video_id']), "
                              f"got {ids.dtype} {tuple(ids.shape)}")
        return self.filled_keys(), self.filled_ids(), ids.to(q.device)

    def logits_lse(self, q: torch.Tensor, tau: float, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``q: (B, dim)`` -> ``(B,)`` log-sum-exp of ``q @ bank.T / tau`` over the whole
        (all ranks') filled bank, without the entries of each query's own video when its
        ``ids: (B,)`` are given; ``-inf`` if nothing is left. Differentiable w.r.t. ``q``."""
        keys, key_ids, ids = self._bank_for(q, ids)
        if self.world_size == 1:
            return _partial_lse(q, keys, tau, self.impl, ids, key_ids)
        return ShardedBankLSE.apply(q, keys, tau, self.group, self.impl, ids, key_ids)

    def nce(self, q: torch.Tensor, k_pos: torch.Tensor, tau: float, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample InfoNCE ``-log(e^{q.k+/tau} / (e^{q.k+/tau} + sum_bank e^{q.k/tau}))``.

        ``q: (B, dim)``, ``k_pos: (B, dim)`` L2-normalised (``k_pos`` is treated as a constant)
        -> ``(B,)``, differentiable w.r.t. ``q``. ``ids: (B,)`` int64 the queries' video ids:
        bank entries of the query's own video are left out of the sum. A collective when the
        bank is sharded.
        """
        keys, key_ids, q_ids = self._bank_for(q, ids)
        k_pos = k_pos.detach()
        if self.world_size == 1:              # single shard: the fused kernel (an empty bank gives 0)

            return bank_nce(q, k_pos, keys, tau, impl=self.impl, q_ids=q_ids, bank_ids=key_ids)
        lse = self.logits_lse(q, tau, ids)
        pos = (q.to(lse.dtype) * k_pos.to(lse.dtype)).sum(-1) / tau
        return torch.logaddexp(pos, lse) - pos

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard: keys and ids (CPU copies), pointer, fill, rank, world size, total size."""
        return {"version": STATE_VERSION, "keys": self.keys.detach().cpu().clone(), "ids": self.ids.cpu().clone(),
                "ptr": self.ptr,
                "filled": self.filled, "rank": self.rank, "world_size": self.world_size,
                "size": self.size, "dim": self.dim}

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's shard saved by :meth:`state_dict` at the same world size (a version-1
        state, without ids, loads with every id unknown: see the module docstring)."""
        state = _check_state(state, "MemoryBank.load_state_dict")
        if state["size"] != self.size or state["dim"] != self.dim:
            raise MohicoError(f"bank checkpoint holds size={state['size']}, dim={state['dim']} but this run has "
                              f"bank.size={self.size}, bank.dim={self.dim}: use the same bank.size/bank.dim as the "
                              f"checkpoint, or start the bank empty (do not load its state)")
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise MohicoError(f"bank checkpoint was saved by rank {state['rank']} of {state['world_size']} but this "
                              f"is rank {self.rank} of {self.world_size}: reshard all ranks' states first with "
                              f"MemoryBank.reshard(states, new_world_size={self.world_size})")
        keys = state["keys"]
        if tuple(keys.shape) != (self.shard_size, self.dim):
            raise MohicoError(f"bank checkpoint keys have shape {tuple(keys.shape)}, expected "
                              f"{(self.shard_size, self.dim)}: the checkpoint is corrupt or from another run")
        if not (0 <= state["ptr"] < self.shard_size and 0 <= state["filled"] <= self.shard_size):
            raise MohicoError(f"bank checkpoint has ptr={state['ptr']}, filled={state['filled']} outside "
                              f"[0, {self.shard_size}]: the checkpoint is corrupt")
        if tuple(state["ids"].shape) != (self.shard_size,):
            raise MohicoError(f"bank checkpoint ids have shape {tuple(state['ids'].shape)}, expected "
                              f"({self.shard_size},): the checkpoint is corrupt or from another run")
        self.keys = keys.to(device=self.keys.device, dtype=self.keys.dtype).clone()
        self.ids = state["ids"].to(device=self.ids.device, dtype=torch.int64).clone()
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])

    @staticmethod
    def reshard(states: list[dict], new_world_size: int) -> list[dict]:
        """Convert all ranks' states (from a run with ``len(states)`` ranks) to ``new_world_size``.

        Age order is kept: the ranks enqueue in lockstep, so the a-th newest key of every
        rank is about equally old. The keys are merged newest-first, interleaving ranks
        (rank 0's newest, rank 1's newest, ..., rank 0's second newest, ...), and dealt out
        round-robin in the same order to the new ranks; each new shard is stored oldest ->
        newest from slot 0. Resharding W -> W' -> W returns every rank's keys in the same
        order. The total size is kept; ``size`` must be divisible by ``new_world_size``.
        """
        if not states:
            raise MohicoError("MemoryBank.reshard: no states given")
        states = sorted((_check_state(s, "MemoryBank.reshard") for s in states), key=lambda s: s["rank"])
        world, size, dim = states[0]["world_size"], states[0]["size"], states[0]["dim"]
        if [s["rank"] for s in states] != list(range(world)) or len(states) != world or \
                any((s["world_size"], s["size"], s["dim"]) != (world, size, dim) for s in states):
            raise MohicoError(f"MemoryBank.reshard: expected one state per rank 0..{world - 1} of the same bank "
                              f"(size {size}, dim {dim}); got ranks {[s['rank'] for s in states]} with world sizes "
                              f"{sorted({s['world_size'] for s in states})}: pass every rank's bank file of one checkpoint")
        if new_world_size <= 0 or size % new_world_size:
            raise MohicoError(f"MemoryBank.reshard: bank size {size} is not divisible by the new world size "
                              f"{new_world_size}: change bank.size or the number of ranks")
        newest_first = [_ordered(s, "keys").flip(0) for s in states]
        ids_newest_first = [_ordered(s, "ids").flip(0) for s in states]
        ages = torch.cat([torch.arange(len(k)) for k in newest_first])
        ranks = torch.cat([torch.full((len(k),), r) for r, k in enumerate(newest_first)])
        order = torch.argsort(ages * world + ranks)                                # newest first, ranks interleaved
        merged, merged_ids = torch.cat(newest_first)[order], torch.cat(ids_newest_first)[order]
        shard = size // new_world_size
        out = []
        for r in range(new_world_size):
            mine = merged[r::new_world_size].flip(0)                              # oldest -> newest
            keys = torch.zeros(shard, dim, dtype=merged.dtype)
            keys[:len(mine)] = mine
            ids = torch.full((shard,), UNKNOWN_ID, dtype=torch.int64)
            ids[:len(mine)] = merged_ids[r::new_world_size].flip(0)
            out.append({"version": STATE_VERSION, "keys": keys, "ids": ids, "ptr": len(mine) % shard,
                        "filled": len(mine), "rank": r, "world_size": new_world_size, "size": size, "dim": dim})
        return out


def _check_state(state: dict, where: str) -> dict:
    """The state, checked; a version-1 state (before per-slot video ids) is upgraded with every
    id unknown (-1), with a warning: those keys are not masked as own-video negatives until evicted."""
    need = {"version", "keys", "ptr", "filled", "rank", "world_size", "size", "dim"}
    if not isinstance(state, dict) or not need <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise MohicoError(f"{where}: not a memory-bank state (expected keys {sorted(need)}, got {got})")
    if state["version"] == 1 and "ids" not in state:
        log.warning("%s: bank state version 1 has no video ids: its %d keys count as negatives of every query "
                    "(own video included) until they are evicted", where, int(state["filled"]))
        state = dict(state, version=STATE_VERSION,
                     ids=torch.full((state["keys"].shape[0],), UNKNOWN_ID, dtype=torch.int64))
    if state["version"] != STATE_VERSION or "ids" not in state:
        raise MohicoError(f"{where}: bank state version {state['version']} is not supported (this release "
                          f"reads versions 1 and {STATE_VERSION}, and version {STATE_VERSION} needs 'ids')")
    return state


def _ordered(state: dict, field: str = "keys") -> torch.Tensor:
    """``state[field]`` (keys or ids) of the filled slots, oldest -> newest."""
    rows, ptr, filled = state[field], state["ptr"], state["filled"]
    if filled < rows.shape[0]:
        return rows[:filled]
    return torch.cat([rows[ptr:], rows[:ptr]], 0)
