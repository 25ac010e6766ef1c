"""Storage reads of the data loader per log window: bytes per clip and per second, per rank.

    meter = IOMeter(rank)                       # after the loader's state is restored
    counters.update(meter.window(loader.stats(), local_clips, seconds))   # before reduce_metrics
    row.update(meter.totals(reduced, global_clips, seconds))              # after it

The loader counts every byte its workers read from the shard tars (``stats()["bytes_read"]``,
cumulative and carried through checkpoints). :meth:`IOMeter.window` turns this rank's growth of
that counter since the last window into ``rank{r}_bytes_per_clip`` and ``rank{r}_read_bytes_per_s``
(keys unique to the rank, so the trainer's sum over ranks reports each rank's own value as
``data/rank{r}_...``) and ``window_bytes_read`` (summed: all ranks); :meth:`totals` gives the
run-wide ``io/bytes_per_clip`` and ``io/read_MB_per_s``. The counter is read when a batch reaches
the trainer, so prefetched batches' reads show up one window late; over many windows it averages out.
"""
from __future__ import annotations


class IOMeter:
    """Per-window read rates of one rank's loader."""

    def __init__(self, rank: int, start_stats: dict | None = None):
        self.rank = int(rank)
        self.last = float((start_stats or {}).get("bytes_read", 0))

    def window(self, stats: dict, clips: float, seconds: float) -> dict[str, float]:
        """This rank's window: ``stats`` = ``loader.stats()``, ``clips`` read by this rank."""
        now = float(stats.get("bytes_read", self.last))
        delta, self.last = now - self.last, now
        r = self.rank
        return {"window_bytes_read": delta,
                f"rank{r}_bytes_per_clip": delta / clips if clips > 0 else 0.0,
                f"rank{r}_read_bytes_per_s": delta / seconds if seconds > 0 else 0.0}

    @staticmethod
    def totals(reduced: dict, clips: float, seconds: float) -> dict[str, float]:
        """Run-wide rates from the reduced metrics (``data/window_bytes_read`` summed over ranks)."""
        total = float(reduced.get("data/window_bytes_read", 0.0))
        return {"io/bytes_per_clip": total / clips if clips > 0 else 0.0,
                "io/read_MB_per_s": total / seconds / 1e6 if seconds > 0 else 0.0}
