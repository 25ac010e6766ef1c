"""Non-finite losses stop training instead of training on: an all-reduced check per micro-step.

    guard = NonFiniteGuard(cfg.trainer.nonfinite_limit)
    if guard.finite(loss, device):          # collective: every rank gets the same answer
        engine.backward(loss); engine.step()
    else:
        guard.skipped(step)                  # counts; raises NonFiniteError past the limit
    ...
    guard.check_weights(module, device)      # collective; before every checkpoint

A micro-step whose loss is NaN/inf on any rank is skipped on every rank (no backward, no
optimizer step). ``limit`` skipped steps in a row stop the run with :class:`NonFiniteError`
(exit code 4); a finite step resets the run of skips. Weights or buffers that are not finite
are never checkpointed: :meth:`NonFiniteGuard.check_weights` raises before the save, so the
last checkpoint on disk (and rotation's choice of what to delete) only ever sees finite states.
"""
from __future__ import annotations

import logging

import torch

from mohico import dist
from mohico.errors import ExitCode, MohicoError

log = logging.getLogger("mohico.trainer")

NONFINITE_EXIT_CODE = ExitCode.NONFINITE.value


class NonFiniteError(MohicoError):
    """Training stopped on non-finite losses or weights (exit code 4)."""

    exit_code = NONFINITE_EXIT_CODE


class NonFiniteGuard:
    """Counts skipped non-finite micro-steps: ``total`` and ``in_a_row``."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.total = 0
        self.in_a_row = 0
        self.last_bad = False

    def finite(self, loss: torch.Tensor, device) -> bool:
        """True when ``loss`` is finite on every rank (collective: one int all-reduce)."""
        bad = dist.any_rank(not bool(torch.isfinite(loss.detach()).all()), device)
        self.last_bad = bad
        if not bad:
            self.in_a_row = 0
        return not bad

    def skipped(self, step: int, hint: str = "") -> None:
        """Count a skipped micro-step of optimizer step ``step`` (0-based); raise past the limit."""
        self.total += 1
        self.in_a_row += 1
        log.warning("step %d: non-finite loss on at least one rank: micro-step skipped (%d in a row, %d in all; "
                    "the run stops after %d in a row)", step + 1, self.in_a_row, self.total, self.limit)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"stopped at step {step + 1}: the loss was NaN/inf for {self.in_a_row} micro-steps in a row "
                f"(trainer.nonfinite_limit={self.limit}); nothing was checkpointed after the last finite state. "
                f"Lower optim.lr (or set optim.grad_clip), check the data, and resume from the last checkpoint"
                f"{hint}.")

    def check_weights(self, module: torch.nn.Module, step: int, device) -> None:
        """Raise NonFiniteError (on every rank: collective) if a floating parameter or buffer of
        ``module`` is NaN/inf, or this step's loss was not finite: that state is never saved."""
        flags = [torch.isfinite(t.detach()).all() for t in (*module.parameters(), *module.buffers())
                 if t.is_floating_point()]
        local_bad = bool(flags) and not bool(torch.stack(flags).all())
        if dist.any_rank(local_bad or self.last_bad, device):
            raise NonFiniteError(
                f"step {step}: the model's weights or this step's loss are NaN/inf, so this state is not "
                f"checkpointed (the previous checkpoints are kept). Lower optim.lr (or set optim.grad_clip) and "
                f"resume from the last checkpoint.")
