"""Inputs of the shard writer: which files, in which order, under which key and label."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from mohico.datasets.sample_schema import label_for
from mohico.errors import UsageError

log = logging.getLogger(__name__)


def list_inputs(src: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``[(absolute path, source name)]`` sorted by source name.

    ``src`` is a folder (every file below it, recursively, except hidden files and ``.json``
    ground-truth/metadata files), a text file with one path per line (relative paths are
    relative to the list file; blank lines and ``#`` comments are ignored), or a list of
    ``(path, source name)`` pairs (e.g. a benchmark split: ``benchmark_layouts.split_inputs``).
    """
    if isinstance(src, (list, tuple)):
        if not all(isinstance(x, (list, tuple)) and len(x) == 2 for x in src):
            raise UsageError("inputs: a list of (path, source name) pairs")
        return sorted({str(s): (str(p), str(s)) for p, s in src}.values(), key=lambda x: x[1])
    src = Path(src)
    if src.is_dir():
        excl = Path(exclude).resolve() if exclude else None
        out = []
        for p in src.rglob("*"):
            rel = p.relative_to(src)
            if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() == ".json" or not p.is_file():
                continue
            if excl is not None and (p.resolve() == excl or excl in p.resolve().parents):
                continue
            out.append((str(p.resolve()), rel.as_posix()))
        return sorted(out, key=lambda x: x[1])
    if src.is_file():
        out, seen = [], set()
        for line in src.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line or line.startswith("#") or line in seen:
                continue
            seen.add(line)
            p = Path(line) if Path(line).is_absolute() else src.parent / line
            out.append((str(p), line))
        return sorted(out, key=lambda x: x[1])
    raise UsageError(f"input {src} does not exist: give a folder of videos or a text file listing them")


def load_labels(path: str | os.PathLike | None) -> dict[str, object]:
    """Labels by source name: a JSON object ``{source: label}`` or text lines ``source<TAB or space>label``."""
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read labels file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"labels file {path} is not UTF-8 text (byte {e.start}: a binary file?); give a JSON "
                         f"object {{source: label}} or lines 'source<TAB>label'") from None
    seen: set[str] = set()
    dups: list[str] = []

    def note(name: str) -> None:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)

    def pairs(items):
        for name, _ in items:
            note(name)
        return dict(items)

    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as e:
            raise UsageError(f"labels file {path} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"labels file {path} must hold a JSON object {{source: label}}")
        for name, lab in obj.items():
            if isinstance(lab, bool) or not isinstance(lab, (int, str)) or (isinstance(lab, str) and not lab.strip()):
                raise UsageError(f"labels file {path}: the label of {name!r} is {lab!r}; a label must be an integer "
                                 f"or a non-empty string")
        _warn_duplicates(path, dups)
        return obj
    labels: dict[str, object] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
        if len(parts) != 2:
            raise UsageError(f"labels file {path} line {n}: expected 'source<TAB>label', got {line!r}")
        name, lab = parts[0].strip(), parts[1].strip()
        note(name)
        labels[name] = int(lab) if re.fullmatch(r"-?\d+", lab) else lab
    _warn_duplicates(path, dups)
    return labels


def _warn_duplicates(path: Path, dups: list[str]) -> None:
    if dups:
        log.warning("labels file %s gives %d name(s) more than once; the last entry of each wins: %s", path,
                    len(dups), ", ".join(repr(d) for d in dups[:10]) + (" ..." if len(dups) > 10 else ""))


def check_labels(labels: dict, sources: list[str], where: str) -> int:
    """Warn (naming ``where``, the labels file, and the counts) when ``labels`` gives no label to
    any of ``sources``, or none to some of them; returns how many sources have a label."""
    if not labels or not sources:
        return 0
    labelled = [s for s in sources if label_for(labels, s) is not None]
    used = {k for s in labelled for k in (s, Path(s).name, Path(s).stem) if k in labels}
    unused = [k for k in labels if k not in used]
    if not labelled:
        log.warning("labels file %s matches none of the %d input videos: every label is None. Its %d labels name "
                    "other videos (e.g. %r) than the inputs (e.g. %r); a label's name must be a video's path as "
                    "listed, its file name or its stem", where, len(sources), len(labels), unused[0], sources[0])
    elif len(labelled) < len(sources):
        missing = [s for s in sources if label_for(labels, s) is None]
        log.warning("labels file %s gives no label to %d of the %d input videos (their label is None, e.g. %r); "
                    "%d of its labels name no input video", where, len(missing), len(sources), missing[0], len(unused))
    return len(labelled)


def sample_key(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
