"""One optimizer step: ``trainer.grad_accum`` micro-batches through the DeepSpeed engine, then the
key encoders' EMA update.

    result = train_step(engine, batches, progress, ctx)     # ctx: StepContext (device, guard, ...)

Per micro-batch: the next :class:`~mohico.datasets.load.batch.ClipBatch` (a finite epoch rolls
over), moved to the device, ``engine(clips, motion, progress, video_id)`` -> ``(loss, terms)``; a NaN/inf loss on any rank skips the micro-step on every rank
(:class:`~mohico.trainer.nonfinite.NonFiniteGuard`); else ``engine.backward(loss)`` and
``engine.step()`` (DeepSpeed steps the optimizer at the accumulation boundary). The loss and
every term come back to the host in one transfer per micro-step, right after the guard's check
(which already waited for the forward), before the backward is queued.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mohico.datasets.load.batch import ClipBatch
from mohico.trainer.batches import next_batch


class Batches:
    """Endless batches of ``loader``: a finite epoch (``data.resampled=false``) that ends starts the next."""

    def __init__(self, loader):
        self.loader, self.data = loader, None

    def next(self) -> ClipBatch:
        if self.data is None:
            self.data = iter(self.loader)
        self.data, batch = next_batch(self.data, self.loader)
        return batch


@dataclass
class StepContext:
    """What every step needs besides the engine and the data."""
    device: torch.device
    grad_accum: int
    world: int
    guard: object          # NonFiniteGuard
    health: object         # StepHealth
    dog: object            # Watchdog


@dataclass
class StepResult:
    loss: float                    # mean loss of the finite micro-steps (nan if none was finite)
    terms: dict[str, float]        # each objective term summed over the finite micro-steps / grad_accum
    clips: int                     # clips trained on, all ranks (B * V * world per finite micro-step)
    wait_s: float                  # seconds spent waiting for batches
    norm_before_step: float | None  # ZeRO 0: the gradients' norm before the step (StepHealth)
    batch: ClipBatch | None = field(repr=False, default=None)   # the last micro-batch (W&B images)


def train_step(engine, batches: Batches, progress: float, ctx: StepContext, step: int) -> StepResult:
    """Optimizer step ``step`` (0-based) at training ``progress``; returns what to log."""
    wait, loss_sum, n_ok, norm0, clips_seen = 0.0, 0.0, 0, None, 0
    terms_sum: dict[str, float] = {}
    batch = None
    for micro in range(ctx.grad_accum):
        t_wait = time.perf_counter()
        batch = batches.next()          # the loader's randomness is its own: no training RNG stream moves
        ctx.dog.beat("the forward/backward pass and its collectives", collective=True)
        wait += time.perf_counter() - t_wait
        batch = batch.to(ctx.device, non_blocking=True)
        clips = batch.clips              # video_id: own-video clips and bank keys are not negatives
        loss, terms = engine(clips, batch.motion, progress, video_id=batch.video_id)
        if not ctx.guard.finite(loss, ctx.device):   # NaN/inf on any rank: every rank skips it
            ctx.guard.skipped(step)
            continue
        # one device-to-host transfer for the loss and every term (not one sync per term), here where
        # the guard has just waited for the forward: after the step it would wait for backward + step too
        host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=ctx.device).reshape(())
                            for v in (loss.detach(), *terms.values())]).tolist()
        engine.backward(loss)
        norm0 = ctx.health.norm_before_step(engine) if micro == ctx.grad_accum - 1 else None
        engine.step()
        n_ok += 1
        loss_sum += host[0]
        for k, v in zip(terms, host[1:]):
            terms_sum[k] = terms_sum.get(k, 0.0) + v / ctx.grad_accum
        clips_seen += clips.shape[0] * clips.shape[1] * ctx.world
    ctx.dog.beat()
    with torch.no_grad():
        engine.module.momentum_update()
    return StepResult(loss_sum / n_ok if n_ok else float("nan"), terms_sum, clips_seen, wait, norm0, batch)
