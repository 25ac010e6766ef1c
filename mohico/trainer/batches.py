"""Batches for the training loop: epoch roll-over of a finite loader and loader reports.

    data, batch = next_batch(data, loader)      # a finite epoch that ends starts the next one
    loader_report(loader)                        # "loader counters {...}, last loader error: ..."
"""
from __future__ import annotations

import logging

from mohico.errors import MohicoError

log = logging.getLogger("mohico.trainer")


def next_batch(data, loader):
    """The next batch; a finite loader (``data.resampled=false``) that ends its epoch starts the
    next one. An epoch that yields no batch at all is an error naming the loader's counters."""
    try:
        return data, next(data)
    except StopIteration:
        log.info("data: epoch over, starting the next one")
    data = iter(loader)
    try:
        return data, next(data)
    except StopIteration:
        stats = loader.stats() if hasattr(loader, "stats") else {}
        last = loader.last_error() if hasattr(loader, "last_error") else ""
        raise MohicoError(f"a whole data epoch gave no batch (loader counters: {stats}; last error: {last or 'none'}): "
                          f"fewer usable samples than data.batch_size x data.num_workers on this rank? Use fewer "
                          f"workers or more shards (`mohico shards`), or check data.shards") from None


def loader_report(loader) -> str:
    """The loader's counters and last error, for stall and signal messages."""
    try:
        stats = {k: v for k, v in (loader.stats() or {}).items() if v}
        last = loader.last_error() if hasattr(loader, "last_error") else ""
    except Exception as e:  # noqa: BLE001 - called from a watchdog thread
        return f"loader state unavailable ({type(e).__name__}: {e})"
    return f"loader counters {stats or 'all zero'}, last loader error: {last or 'none'}"
