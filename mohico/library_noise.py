"""Library messages a mohico user cannot act on, silenced at their source — each by its exact text,
so that any other warning of the same library still shows. Installed by ``import mohico`` (every
entry point: the CLI, each rank, ``mohico.load_encoder``, ``hubconf.py``).

- DeepSpeed's "You are using ZeRO with an untested optimizer": mohico's optimizers (SGD, LARS)
  run under ZeRO on purpose (``zero_allow_untested_optimizer``), their ZeRO checkpoints and
  resumes are tested bitwise (tests/test_trainer.py).
- DeepSpeed's "Setting accelerator to CPU. If you have GPU ...": logged whenever DeepSpeed is
  imported without CUDA (``mohico export``, ``load_encoder``, hub calls); mohico reads
  ``trainer.device`` itself, and a GPU it cannot see is reported by mohico (``mohico.trainer.engine``).
- torch's FutureWarning "`torch.distributed.all_gather_into_tensor` is deprecated": raised inside
  DeepSpeed's ZeRO all-gather, not by mohico's collectives (``mohico.dist`` uses ``all_gather``).

Stdlib only (floor 0): it must run before DeepSpeed or torch.distributed speak.
"""
from __future__ import annotations

import logging
import warnings

DEEPSPEED_LOGGER = "DeepSpeed"
DROPPED_LOG_MESSAGES = (
    "You are using ZeRO with an untested optimizer",
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it",
)
IGNORED_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
)


class DropLibraryNoise(logging.Filter):
    """Drops a log record whose message contains one of :data:`DROPPED_LOG_MESSAGES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(m in text for m in DROPPED_LOG_MESSAGES)


def install() -> None:
    """Add the filters (idempotent)."""
    for category, pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, DropLibraryNoise) for f in logger.filters):
        logger.addFilter(DropLibraryNoise())
