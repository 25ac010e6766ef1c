"""Small shared helpers: atomic writes; whether a folder can be written (:func:`unwritable_dir`)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def unwritable_dir(path: str | os.PathLike, key: str) -> str | None:
    """Why folder ``path`` (config key ``key``) cannot be created or written, as an error message
    naming the key and the fix; None if it can. Checked without writing anything: the folder, or
    its nearest existing parent, must be a folder this user may write, on a read-write file system."""
    target = Path(path).absolute()
    probe = target
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = f"{probe} is not a folder" + ("" if probe == target else " (a parent of it)")
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is not writable by this user"
    else:
        try:
            if os.statvfs(probe).f_flag & os.ST_RDONLY:
                why = f"{probe} is on a read-only file system"
        except OSError as e:
            why = f"{probe} cannot be read ({e})"
    if why is None:
        return None
    return f"'{key}': {path} cannot be {'written' if probe == target else 'created'}: {why}. Set {key} to a folder you can write"
