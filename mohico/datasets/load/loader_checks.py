"""Loader checks that turn silent hangs into clear errors.

- :func:`loader_start_problems` (at start, in :func:`mohico.datasets.load.pipeline.build_loader`;
  `mohico train --dry-run` reports them all): the shards' resolution against the crops
  (:func:`mohico.datasets.load.shard_geometry.check_crop_resolution`) and the sample count below.
- :func:`check_enough_samples` (at start): ``world_size x num_workers`` streams need at least as
  many samples; the shard manifests (``manifest.json`` next to the tars, written by ``mohico
  shards``) give the per-shard counts without reading the tars. Shards without a manifest are
  not counted (the run-time check below still catches a starved stream).
- :class:`BadRun` (in each loader worker): a run of unusable samples that lasts a whole epoch of
  the stream, or ``NO_USABLE_SAMPLE_S`` seconds, makes the worker give up.
- :func:`shards_content_problem` (`mohico train --dry-run`): local shards that are empty, not
  tars, or hold no usable sample (:func:`mohico.datasets.load.sample_meta.sample_meta`, the rule the
  workers apply to every sample), read from the tar headers and json members only: the shards a
  run would otherwise skip sample by sample until :class:`BadRun` gives up.
- :func:`no_usable_data_message` (at run time): what a stream that cannot produce a batch
  reports (the shards, the skip reasons counted, the last error and the fix).
"""
from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import Optional, Sequence

from mohico.datasets.load.sample_meta import BadSample, sample_meta
from mohico.datasets.load.shard_geometry import check_crop_resolution
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


def loader_start_problems(cfg, urls: list[str], world_size: int) -> list[str]:
    """The ConfigError messages of the loader's start-up checks for ``urls`` at ``world_size`` ranks
    (``cfg``: the run's Config): crops the shards' resolution cannot serve, fewer samples than
    loader streams. :func:`~mohico.datasets.load.pipeline.build_loader` raises the first."""
    problems = []
    for check in (lambda: check_crop_resolution(cfg.data, cfg.sampling, urls),
                  lambda: check_enough_samples(urls, int(world_size), max(1, cfg.data.num_workers))):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    return problems


def _samples(tar: tarfile.TarFile):
    """The samples of an open tar as webdataset groups them (consecutive members sharing a key):
    ``{"__key__", ext: bytes}``, the json members read, every other member ``b""`` (not read)."""
    from webdataset.tariterators import base_plus_ext

    sample: dict = {}
    for m in tar:
        if not m.isfile():
            continue
        key, ext = base_plus_ext(m.name)
        if key is None:
            continue
        if sample and key != sample["__key__"]:
            yield sample
            sample = {}
        sample["__key__"] = key
        ext = ext.lower()
        sample[ext] = tar.extractfile(m).read() if ext == "json" else b""
    if sample:
        yield sample


def shard_problem(url: str) -> Optional[str]:
    """Why local shard ``url`` gives no usable sample (empty, not a tar, no sample, or no sample with a
    json and a video member: the first such problem); None once one sample is usable."""
    path = Path(url)
    if path.stat().st_size == 0:
        return f"{url} is an empty file"
    first = None
    try:
        with tarfile.open(path) as tar:
            for sample in _samples(tar):
                try:
                    sample_meta(sample, f"{url}:{sample['__key__']}")
                    return None
                except BadSample as e:
                    first = first or str(e)
    except (tarfile.TarError, OSError) as e:
        return f"{url} is not a readable tar ({e})"
    return f"{url} holds no sample" if first is None else f"{url} holds no usable sample (first: {first})"


def shards_content_problem(urls: Sequence[str], max_read: int = 16) -> Optional[tuple[str, str]]:
    """``("error" | "warning", message)`` when local shards of ``urls`` (the first ``max_read``)
    give no usable sample (:func:`shard_problem`): an error when none of them does and all were
    read, a warning when some do not; None when every shard read has a usable sample."""
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")][:max_read]
    bad = [p for p in (shard_problem(u) for u in local) if p]
    if not bad:
        return None
    shown = "; ".join(bad[:3]) + (f"; ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
    fix = ("point data.shards at shards written by `mohico shards` (a folder of shard-NNNNNN.tar with a "
           "manifest.json; `mohico inspect SHARD` shows what one holds)")
    if len(bad) == len(local) == len(urls):
        return "error", (f"'data.shards': none of the {len(urls)} shard(s) gives a usable sample (a json and a video "
                         f"member): {shown}. A run would skip every sample until its loader gives up. Fix: {fix}")
    where = "of the shards" if len(local) == len(urls) else f"of the first {len(local)} of {len(urls)} shards"
    return "warning", (f"'data.shards': {len(bad)} {where} give no usable sample: {shown}; a run skips them. "
                       f"If that is not meant: {fix}")


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
