"""Checkpoint integrity: size + sha256 digests of every file, and their verification.

    digests = file_digests([tmp / "client_rank_00000.pt", ...])   # {name: {"size", "sha256"}}
    problems = verify_checkpoint(ckdir, tag)                       # [] when every recorded file matches

The meta file of a checkpoint (``mohico_meta.json``) records, under ``"files"``, the size and
sha256 of every file of the checkpoint folder (the meta file itself excluded). A checkpoint
written before digests existed (no ``"files"``) is checked for the files it must hold.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mohico.trainer.checkpoint.layout import META
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
