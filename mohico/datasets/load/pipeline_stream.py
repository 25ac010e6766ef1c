"""Deterministic, resumable stream of raw shard samples for one loader worker.

Shards: the URLs :func:`mohico.datasets.shard_list.expand_shards` lists (patterns, folders, list
files; ``pipe:`` commands refused unless ``data.allow_commands``). Tars are read with webdataset
(``gopen`` + ``tar_file_iterator`` + ``group_by_keys``), so local paths and ``http(s)`` URLs work
(fetched by ``curl``, the URL one argument, no shell).

Split: ``num_streams = world_size * workers`` streams; stream ``s = rank * workers + worker``.
Every epoch the shard list is permuted with ``(seed, epoch)``; with at least ``num_streams``
shards stream ``s`` reads shards ``perm[s::num_streams]`` (split by node, then by worker);
with fewer shards every stream reads them all and keeps every ``num_streams``-th sample
(slower, but no stream is starved).

Order: a shuffle buffer of ``shuffle_buffer`` samples with its own generator
``(seed, epoch, stream)``; ``resampled=True`` makes the stream infinite (epoch after epoch, a
fresh permutation each), else it ends after one epoch.

Several draws per read (``draws(sample) -> R``, ``data.samples_per_read``): one video read puts
R entries into the buffer, ``(sample, ref + (r,))`` for r = 0..R-1, sharing the sample's bytes;
the consumer draws each with its own generator ``(seed, epoch, rank, key, r)``. :meth:`next`
takes ``avoid``, the videos already in the batch being built, and skips buffer entries of those
videos (the first acceptable one after the drawn position, cyclically; one generator draw per
pick, as with R = 1). Bound: each of the <= B - 1 videos already in a batch of B has at most
R - 1 entries left in the buffer, so while the buffer holds at least ``(B - 1) * (R - 1) + 1``
entries (``shuffle_buffer`` >= that, and always except when a finite epoch drains) no video
appears twice in one batch; below that it can (the batch is always filled).

I/O: every byte read from a tar (also samples skipped on resume or by the modulo split) is
counted in ``bytes_read``.

State (:meth:`SampleStream.state_dict`) is small: the epoch, the cursor (shard position,
samples read in it, samples seen this epoch), the buffer's generator state and the buffer as
*references* ``(shard position, sample index)``; :meth:`load_state_dict` re-reads the referenced
samples (at most the few shards the buffer spans), so the stream continues exactly.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np


def _gen(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words])))


class ShardReadError(Exception):
    """A shard could not be read to its end (truncated tar, I/O error)."""


class _CountingReader:
    """A read-only file object that reports the bytes it returns to ``on_read(n)``."""

    def __init__(self, f, on_read: Callable[[int], None]):
        self._f, self._on_read = f, on_read

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._on_read(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)


def iter_shard(url: str, errors: Optional[list] = None,
               on_read: Optional[Callable[[int], None]] = None) -> Iterator[dict]:
    """Samples of one tar (``{"__key__", "__url__", ext: bytes}``) via webdataset.

    A read error ends the shard early; it is appended to ``errors`` (never raised).
    ``on_read(n)`` is called with the size of every read from the tar (I/O accounting).
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files():
        stream = None
        try:
            stream = gopen(url)
            for f in tar_file_iterator(stream if on_read is None else _CountingReader(stream, on_read)):
                f["__url__"] = url
                yield f
        except Exception as e:  # noqa: BLE001 - truncated/corrupt tar, I/O: end this shard
            if errors is not None:
                errors.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001
                    pass

    try:
        yield from group_by_keys(files())
    except ValueError as e:   # duplicate member names
        if errors is not None:
            errors.append(f"{url}: {e}")


class SampleStream:
    """Raw samples for stream ``stream_id`` of ``num_streams``. :meth:`next` returns a shallow
    copy of the sample with ``__epoch__``, ``__draw__`` (r) and ``__ref__`` (the video's
    ``(epoch, shard_pos, index)``) set; ``draws(sample)`` (default 1) is how many entries one
    read puts into the buffer."""

    def __init__(self, urls: list[str], seed: int, stream_id: int, num_streams: int,
                 shuffle_buffer: int = 64, resampled: bool = True,
                 draws: Optional[Callable[[dict], int]] = None):
        self.urls, self.seed = list(urls), int(seed)
        self.stream_id, self.num_streams = int(stream_id), int(num_streams)
        self.buffer_size, self.resampled = max(int(shuffle_buffer), 1), bool(resampled)
        self.draws = draws
        self.read_errors: list[str] = []
        self.bytes_read = 0
        self._reset(epoch=0)

    # ------------------------------------------------------------------ epoch layout
    def _reset(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.shard_pos = 0          # position in this epoch's shard list
        self.in_shard = 0           # samples read from the current shard
        self.seen = 0               # samples read this epoch (all shards, before the modulo split)
        self.kept = 0               # samples of this epoch that went to this stream
        self.buffer: list[tuple[dict, tuple]] = []
        self.ended = False          # finite mode: this epoch's input is exhausted
        self._rng = _gen(self.seed, self.epoch, self.stream_id, 0x5EED)
        self._iter: Optional[Iterator] = None

    def shard_list(self, epoch: int) -> list[str]:
        perm = _gen(self.seed, epoch, 0xC0FFEE).permutation(len(self.urls))
        if len(self.urls) >= self.num_streams:
            perm = perm[self.stream_id::self.num_streams]
        return [self.urls[i] for i in perm]

    @property
    def _modulo(self) -> bool:
        return len(self.urls) < self.num_streams

    # ------------------------------------------------------------------ raw input
    def _raw(self) -> Iterator[tuple[dict, tuple]]:
        """Samples from the cursor on, to the end of this epoch."""
        shards = self.shard_list(self.epoch)
        while self.shard_pos < len(shards):
            skip = self.in_shard
            for i, sample in enumerate(iter_shard(shards[self.shard_pos], self.read_errors, self._count)):
                if i < skip:
                    continue
                self.in_shard = i + 1
                self.seen += 1
                if self._modulo and (self.seen - 1) % self.num_streams != self.stream_id:
                    continue
                sample["__epoch__"] = self.epoch
                self.kept += 1
                yield sample, (self.epoch, self.shard_pos, i)
            self.shard_pos += 1
            self.in_shard = 0

    def _count(self, n: int) -> None:
        self.bytes_read += n

    def _num_draws(self, sample: dict) -> int:
        return 1 if self.draws is None else max(1, int(self.draws(sample)))

    def _pull(self) -> Optional[tuple[dict, tuple]]:
        if self._iter is None:
            self._iter = self._raw()
        try:
            return next(self._iter)
        except StopIteration:
            return None

    def next(self, avoid=()) -> Optional[dict]:
        """The next sample, or None when a finite stream is exhausted. ``avoid``: video refs
        ``(epoch, shard_pos, index)`` not to return if the buffer holds anything else."""
        while True:
            while not self.ended and len(self.buffer) < self.buffer_size:
                got = self._pull()
                if got is None:
                    self.ended = True
                else:
                    sample, ref = got
                    self.buffer.extend((sample, ref + (r,)) for r in range(self._num_draws(sample)))
            if self.buffer:
                n = len(self.buffer)
                j = int(self._rng.integers(n))
                if avoid:
                    j = next(((j + s) % n for s in range(n) if self.buffer[(j + s) % n][1][:3] not in avoid), j)
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                sample, ref = self.buffer.pop()
                return {**sample, "__draw__": ref[3], "__ref__": ref[:3]}
            if not self.resampled:
                return None
            if self.kept == 0:       # a whole epoch gave this stream no sample (unreadable shards, or
                return None          # fewer samples than streams): give up rather than spin forever
            self._reset(self.epoch + 1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "in_shard": self.in_shard,
                "seen": self.seen, "kept": self.kept, "ended": self.ended, "rng": self._rng.bit_generator.state,
                "buffer": [list(ref) for _, ref in self.buffer],
                "stream_id": self.stream_id, "num_streams": self.num_streams}

    def load_state_dict(self, state: dict) -> None:
        self._reset(int(state["epoch"]))
        self.shard_pos, self.in_shard = int(state["shard_pos"]), int(state["in_shard"])
        self.seen, self.ended = int(state["seen"]), bool(state["ended"])
        self.kept = int(state.get("kept", self.seen))
        self._rng.bit_generator.state = state["rng"]
        refs = [tuple(r) + (0,) * (4 - len(r)) for r in state["buffer"]]   # (ep, pos, idx[, draw])
        wanted: dict[tuple, dict] = {}
        by_shard: dict[tuple, set] = {}
        for ep, pos, idx, _ in refs:
            by_shard.setdefault((ep, pos), set()).add(idx)
        for (ep, pos), idxs in by_shard.items():
            url = self.shard_list(ep)[pos]
            last = max(idxs)
            for i, sample in enumerate(iter_shard(url, self.read_errors, self._count)):
                if i in idxs:
                    sample["__epoch__"] = ep
                    wanted[(ep, pos, i)] = sample
                if i >= last:
                    break
        # a referenced sample that cannot be re-read is dropped (counted by the caller's stats)
        self.buffer = [(wanted[r[:3]], r) for r in refs if r[:3] in wanted]
        self.lost_on_restore = len(refs) - len(self.buffer)
