"""Loader checks that turn silent hangs into clear errors.

- :func:`check_enough_samples` (at start): ``world_size x num_workers`` streams need at least as
  many samples; the shard manifests (``manifest.json`` next to the tars, written by ``mohico
  shards``) give the per-shard counts without reading the tars. Shards without a manifest are
  not counted (the run-time check below still catches a starved stream).
- :class:`BadRun` (in each loader worker): a run of unusable samples that lasts a whole epoch of
  the stream, or ``NO_USABLE_SAMPLE_S`` seconds, makes the worker give up.
- :func:`no_usable_data_message` (at run time): what a stream that cannot produce a batch
  reports (the shards, the skip reasons counted, the last error and the fix).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mohico.errors import ConfigError

NO_USABLE_SAMPLE_S = 60.0     # samples failing for this long without one usable: the loader gives up


def manifest_counts(urls: list[str]) -> int | None:
    """Samples in ``urls`` according to their folders' ``manifest.json`` (None if any is unknown)."""
    manifests: dict[Path, dict] = {}
    total = 0
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            return None
        p = Path(url)
        if p.parent not in manifests:
            try:
                m = json.loads((p.parent / "manifest.json").read_text())
                manifests[p.parent] = {s["name"]: int(s["num_samples"]) for s in m["shards"]}
            except (OSError, ValueError, KeyError, TypeError):
                return None
        n = manifests[p.parent].get(p.name)
        if n is None:
            return None
        total += n
    return total


def check_enough_samples(urls: list[str], world_size: int, workers: int) -> None:
    """Refuse a shard set with fewer samples than loader streams (``world_size x workers``):
    a stream without samples would never deliver a batch."""
    streams = world_size * workers
    if len(urls) >= streams:
        return
    total = manifest_counts(urls)
    if total is not None and total < streams:
        raise ConfigError(
            f"data.shards: {total} samples in {len(urls)} shard(s) (per manifest.json) for {world_size} rank(s) x "
            f"{workers} loader workers = {streams} streams; every stream needs at least one sample. Lower "
            f"data.num_workers (or the number of ranks), or add videos (`mohico shards`).")


def no_usable_data_message(spec, logical: int, why: str, counters: dict, stats: dict) -> str:
    """The error of a loader stream that cannot produce a batch."""
    reasons = {k: v for k, v in stats.items() if k in ("bad_json", "bad_video", "bad_motion", "missing_motion",
                                                        "missing_video", "bad_other", "read_error") and v}
    shards = ", ".join(spec.urls[:3]) + (f", ... ({len(spec.urls)} shards)" if len(spec.urls) > 3 else "")
    streams = spec.world_size * spec.workers
    return (f"rank {spec.rank}, loader stream {logical} of {streams}: {why}. Shards: {shards}; skipped so far: "
            f"{reasons or 'none'}; last error: {counters.get('last_error') or 'none'}. Fix: check that data.shards "
            f"are mohico shards (`mohico shards` writes them), or use fewer loader workers (data.num_workers) / "
            f"ranks, or more shards, when there are fewer samples than {streams} streams.")


class BadRun:
    """A run of unusable samples: ``failed(epoch)`` says why to give up once a whole epoch of
    this stream (one it started) or ``NO_USABLE_SAMPLE_S`` seconds passed without one usable sample."""

    def __init__(self):
        self.since_epoch: int | None = None
        self.since_time = 0.0
        self.count = 0

    def good(self) -> None:
        self.since_epoch = None
        self.count = 0

    def failed(self, epoch: int) -> str:
        self.count += 1
        if self.since_epoch is None:
            self.since_epoch, self.since_time = epoch, time.monotonic()
            return ""
        if epoch >= self.since_epoch + 2:
            return f"a whole epoch of this stream's shards gave no usable sample ({self.count} unusable in a row)"
        waited = time.monotonic() - self.since_time
        if waited > NO_USABLE_SAMPLE_S:
            return f"no usable sample for {waited:.0f} s ({self.count} unusable in a row)"
        return ""
