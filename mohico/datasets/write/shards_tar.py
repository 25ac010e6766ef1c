"""Deterministic WebDataset tar writing and DALI index files (``wds2idx`` format).

A shard is a plain USTAR tar of regular files ``{key}.{ext}`` with fixed headers (mtime 0,
uid/gid 0, no user/group names, mode 0644), so the same samples always give the same bytes.
While writing, the data offset and size of every member are recorded; :func:`index_text` turns
them into DALI's index (``wds2idx`` v1.2): a line ``v1.2 <num_samples>`` then one line per sample
``<ext> <data offset> <size> <name>`` repeated for each of its files in tar order. Writing it from
the offsets avoids re-reading the tar with ``tar --list`` as ``wds2idx`` does.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from mohico.datasets.sample_schema import split_name

BLOCK = tarfile.BLOCKSIZE            # 512
RECORD = tarfile.RECORDSIZE          # 10240: tarfile pads the archive to a multiple of this
INDEX_VERSION = "v1.2"


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class ShardTar:
    """Write samples into ``path`` (opened fresh); :attr:`samples` holds ``[(ext, offset, size, name), ...]`` per sample."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[list[tuple[str, int, int, str]]] = []

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def projected_size(self, files: list[tuple[str, bytes]] = ()) -> int:
        """Size of the finished tar if ``files`` (``[(name, data)]``) were added now."""
        size = self._tar.offset + sum(BLOCK + _padded(len(d)) for _, d in files) + 2 * BLOCK
        return (size + RECORD - 1) // RECORD * RECORD

    def add_sample(self, files: list[tuple[str, bytes]]) -> None:
        """Add one sample: ``files = [("key.webm", bytes), ("key.json", bytes), ...]`` (one key)."""
        keys = {split_name(n)[0] for n, _ in files}
        if len(keys) != 1:
            raise ValueError(f"one sample must share one key, got {sorted(keys)}")
        entries = []
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.type = tarfile.REGTYPE
            self._tar.addfile(ti, io.BytesIO(data))
            offset = self._tar.offset - _padded(len(data))   # data follows its header block(s)
            entries.append((split_name(name)[1], offset, len(data), name))
        self.samples.append(entries)

    def close(self) -> int:
        """Finish the archive, fsync it, return its size."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        size = self._f.tell()
        self._f.close()
        return size

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.path.unlink(missing_ok=True)


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """DALI ``wds2idx`` index for ``samples`` as recorded by :class:`ShardTar`."""
    if not samples:
        raise ValueError("a WebDataset index needs at least one sample")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for bundle in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in bundle))
    return "\n".join(lines) + "\n"


def index_from_tar(path: str | os.PathLike) -> str:
    """Index of an existing tar (regular files grouped by consecutive key), read with :mod:`tarfile`."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            key, ext = split_name(m.name)
            if not key or key.endswith("/"):
                continue
            entry = (ext, m.offset_data, m.size, m.name)
            if key != last:
                samples.append([entry])
                last = key
            else:
                samples[-1].append(entry)
    return index_text(samples)
