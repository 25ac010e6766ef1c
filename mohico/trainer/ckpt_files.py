"""Checkpoint files: size + sha256 digests, verification, write-failure reports.

    digests = file_digests([tmp / "client_rank_00000.pt", ...])   # {name: {"size", "sha256"}}
    problems = verify_checkpoint(ckdir, tag)                       # [] when every recorded file matches

The meta file of a checkpoint (``mohico_meta.json``) records, under ``"files"``, the size and
sha256 of every file of the checkpoint folder (the meta file itself excluded). A checkpoint
written before digests existed (no ``"files"``) is checked for the files it must hold.

Loading (``safe_load``, never unpickling code) lives with the other readers in :mod:`mohico.checkpoint_read`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from mohico import dist
from mohico.checkpoint_read import META
from mohico.errors import MohicoError

CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_digests(paths) -> dict[str, dict]:
    """``{file name: {"size": bytes, "sha256": hex}}`` for each path."""
    return {Path(p).name: {"size": Path(p).stat().st_size, "sha256": sha256_file(Path(p))} for p in paths}


def _required_files(meta: dict) -> list[str]:
    """Files a checkpoint without digests must hold (older releases)."""
    world = int(meta.get("world_size", 1))
    names = ["mp_rank_00_model_states.pt"] + [f"client_rank_{r:05d}.pt" for r in range(world)]
    if int(meta.get("zero_stage", 0)) >= 1:
        names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return names


def verify_checkpoint(ckdir: str | os.PathLike, tag: str, hashes: bool = True) -> list[str]:
    """Problems of checkpoint ``ckdir/tag`` ([] if it is intact): a missing folder or meta file,
    a missing file, a size or (``hashes=True``) sha256 that differs from the meta file's record."""
    folder = Path(ckdir) / tag
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return [f"{folder / META} is unreadable ({type(e).__name__}: {e})"]
    problems = []
    files = meta.get("files")
    if not isinstance(files, dict):
        for name in _required_files(meta):
            if not (folder / name).is_file():
                problems.append(f"{name} is missing")
        return problems
    for name, want in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != want.get("size"):
            problems.append(f"{name} has {size} bytes, {want.get('size')} were written (truncated or replaced)")
        elif hashes and sha256_file(path) != want.get("sha256"):
            problems.append(f"{name}: sha256 differs from the one recorded at save time (corrupted or replaced)")
    return problems


def folder_bytes(folder: Path) -> int:
    """Total size of the files directly in ``folder`` (0 if it does not exist)."""
    if not Path(folder).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def is_disk_full(e: BaseException) -> bool:
    """An exception from writing a file that means 'no space left' (OSError ENOSPC/EDQUOT, or
    torch's ``inline_container.cc`` writer failure, which hides the errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left" in text or "Disk quota" in text or (
        "inline_container" in text and ("write" in text or "unexpected pos" in text))


def write_failure_message(e: BaseException, tmp: Path, ckdir: Path, step: int, last_intact: str | None,
                          previous_bytes: int) -> str:
    """What to tell the user when writing checkpoint ``step`` into ``tmp`` failed with ``e``."""
    try:
        free = shutil.disk_usage(ckdir).free
    except OSError:
        free = -1
    last = f"the last intact checkpoint is {ckdir / last_intact}" if last_intact else "there is no earlier checkpoint"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if is_disk_full(e) or (previous_bytes and 0 <= free < previous_bytes):
        need = f"about {previous_bytes / 2**20:.1f} MiB (the size of the previous checkpoint)" if previous_bytes \
            else "the size of one checkpoint"
        return (f"disk full while writing checkpoint step {step} to {tmp}: it needs {need}, "
                f"{max(free, 0) / 2**20:.1f} MiB are free on that filesystem; {last} (nothing of it was "
                f"touched). Free space or lower checkpoint.keep, then run again: it resumes from there. "
                f"({type(e).__name__}: {first})")
    return f"writing checkpoint step {step} to {tmp} failed ({type(e).__name__}: {first}); {last}"


def gather_digests(mine: dict, error: str, tmp: Path | None) -> dict:
    """Every rank's file digests merged (collective; a barrier). If any rank failed to write,
    rank 0 (``tmp`` given) removes the partial folder and every rank raises that rank's error."""
    parts = dist.all_gather_object((mine, error))
    failed = [(r, e) for r, (_, e) in enumerate(parts) if e]
    if failed:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, msg = failed[0]
        raise MohicoError(f"rank {rank}: {msg}")
    merged: dict = {}
    for d, _ in parts:
        merged.update(d)
    if tmp is not None:       # files no rank claimed (rank 0 hashes them)
        merged.update(file_digests([f for f in tmp.iterdir() if f.is_file() and f.name not in merged and f.name != META]))
    return merged
