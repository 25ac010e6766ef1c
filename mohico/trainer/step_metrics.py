"""Per-step optimizer health for W&B and metrics.jsonl: gradient norm, learning rate, non-finite
steps, seconds since the last step.

    health = StepHealth(zero_stage)
    ... engine.backward(loss) on the last micro-step; norm0 = health.norm_before_step(engine)
    engine.step()
    row = health.after_step(engine, loss, lr, norm0)      # on every rank (no collective)

``optim/grad_norm``: the global 2-norm of the gradients of the optimizer step, before clipping
(DeepSpeed's own at ZeRO 1/2; at ZeRO 0, where DeepSpeed keeps none, computed from the
all-reduced ``.grad`` before the step). ``optim/nonfinite_steps``: how many steps of this process
had a non-finite loss or gradient norm. ``perf/seconds_since_last_step``: wall time between the
ends of two consecutive steps (logging and checkpoints included: a stall shows here).

Per log window: :func:`reduce_metrics` (terms averaged and loader counters summed over the
ranks), :func:`bank_fills`, :func:`memory_mb`.
"""
from __future__ import annotations

import math
import resource
import time

import torch

from mohico import dist


class StepHealth:
    def __init__(self, zero_stage: int):
        self.zero_stage = int(zero_stage)
        self.nonfinite = 0
        self.last_end: float | None = None

    def norm_before_step(self, engine) -> float | None:
        """At ZeRO 0: the gradients' global 2-norm (``.grad`` is all-reduced after the boundary
        backward); else ``None`` (DeepSpeed computes it in the step)."""
        if self.zero_stage != 0:
            return None
        total = None
        for p in engine.module.parameters():
            if p.grad is not None:
                sq = p.grad.detach().double().pow(2).sum()
                total = sq if total is None else total + sq
        return None if total is None else float(total.sqrt())

    def after_step(self, engine, loss: float, lr: float, norm_before: float | None = None) -> dict[str, float]:
        norm = norm_before
        if norm is None:
            got = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
            norm = None if got is None else float(got.item() if torch.is_tensor(got) else got)
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            self.nonfinite += 1
        now = time.perf_counter()
        row = {"lr": lr, "optim/nonfinite_steps": self.nonfinite}
        if norm is not None:
            row["optim/grad_norm"] = norm
        if self.last_end is not None:
            row["perf/seconds_since_last_step"] = now - self.last_end
        self.last_end = now
        return row


def mean_over_ranks(key: str) -> bool:
    """Loader counters that are fractions (``data_wait_fraction``): averaged over the ranks, not summed."""
    return key.endswith(("_fraction", "_frac"))


def reduce_metrics(terms: dict[str, float], counters: dict[str, float]) -> dict[str, float]:
    """Objective terms averaged and loader counters summed over the ranks (collective; fractions
    such as ``data_wait_fraction`` are averaged: :func:`mean_over_ranks`). Key sets may differ
    between ranks (a counter appears once something happened), so the dicts are gathered as
    objects rather than reduced as aligned tensors."""
    parts = dist.all_gather_object((terms, counters))
    out: dict[str, float] = {}
    for key in sorted({k for t, _ in parts for k in t}):
        values = [t[key] for t, _ in parts if key in t]
        out[key] = sum(values) / len(values)
    for key in sorted({k for _, c in parts for k in c}):
        values = [c[key] for _, c in parts if key in c]
        out[f"data/{key}"] = sum(values) / len(values) if mean_over_ranks(key) else sum(values)
    return out


def bank_fills(module) -> dict[str, float]:
    """``{"bank/<objective>_fill": fraction}`` for each memory bank of the module."""
    banks = module.banks() if hasattr(module, "banks") else {}
    return {f"bank/{name}_fill": float(bank.fill) for name, bank in banks.items()}


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux
