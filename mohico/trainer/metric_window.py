"""The console's summary of a log window: every scalar W&B got during the window, and the ETA.

    window = MetricWindow()
    window.add({"loss": 0.7, "lr": 0.1})          # whatever goes to W&B, at each step
    window.summary()   -> {"loss": mean over the window, "lr": last value, ...}; then empties
    format_eta(192.4)  -> "3m12s"

Per key, over the steps of the window that logged it: the **last value** for the keys of
:data:`LAST_VALUE` (a state, not a measurement: the learning rate, running counts) and the **mean**
for every other key (``loss``, ``optim/grad_norm``, ``perf/seconds_since_last_step`` logged each step;
a key logged once in the window -- the window's averages, ``knn/top1``, ``finetune/*`` -- is its
value). Non-numeric values (the batch picture) are left out.
"""
from __future__ import annotations

import math

LAST_VALUE = ("lr", "epoch", "optim/nonfinite_steps", "optim/nonfinite_skipped")


class MetricWindow:
    """Scalars logged since the last :meth:`summary`: per key ``[sum, count, last]``."""

    def __init__(self):
        self.seen: dict[str, list] = {}

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            slot = self.seen.setdefault(key, [0.0, 0, value])
            slot[0], slot[1], slot[2] = slot[0] + value, slot[1] + 1, value

    def summary(self) -> dict[str, float]:
        """``{key: last value (LAST_VALUE) or mean}`` in first-logged order; starts a new window."""
        out = {k: (last if k in LAST_VALUE else total / n) for k, (total, n, last) in self.seen.items()}
        self.seen = {}
        return out


def format_eta(seconds: float) -> str:
    """``"1h02m03s"``, ``"3m12s"``, ``"45s"``; ``"?"`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_metrics(values: dict[str, float]) -> str:
    """``key=value`` pairs, 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())
