"""The official train/test splits of UCF101 and HMDB51, read from their split files.

UCF101 (``UCF101TrainTestSplits-RecognitionTask``, folder ``ucfTrainTestlist/``):
``classInd.txt`` lines ``1 ApplyEyeMakeup``; ``trainlist0N.txt`` lines
``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``; ``testlist0N.txt`` lines
``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi`` (the class is the folder). Videos under the
dataset root as ``UCF-101/<Class>/v_<Class>_gGG_cCC.avi``.

HMDB51 (``test_train_splits``, folder ``testTrainMulti_7030_splits/``): one file per class and
split, ``<class>_test_split<N>.txt``, lines ``<video>.avi <m>`` with ``m`` = 1 train, 2 test, 0
unused. Videos under the root as ``<class>/<video>.avi``.

``split_inputs(layout, root, splits_dir, split)`` -> :class:`Split`: train and test inputs as
``(absolute path, source)`` with ``source`` = the path relative to ``root`` (``<Class>/<file>``),
and labels ``{source: class name}``. A video named in the split files that is not under ``root``
(at its listed path or, failing that, by file name anywhere below it) is reported in
``Split.missing``; no video found at all is a :class:`~mohico.errors.UsageError`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mohico.errors import UsageError

LAYOUTS = ("ucf101", "hmdb51")


@dataclass
class Split:
    layout: str
    split: int
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    labels: dict[str, str]
    classes: list[str]
    missing: list[str] = field(default_factory=list)


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError as e:
        raise UsageError(f"cannot read split file {path}: {e.strerror or e}") from None


def _ucf101(splits_dir: Path, split: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """``(train [(relpath, class)], test [...], classes in classInd order)``."""
    ind = splits_dir / "classInd.txt"
    if not ind.is_file():
        raise UsageError(f"{ind} not found: --splits must be UCF101's ucfTrainTestlist folder "
                         f"(classInd.txt, trainlist0N.txt, testlist0N.txt)")
    classes = []
    for n, ln in enumerate(_read_lines(ind), 1):
        parts = ln.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise UsageError(f"{ind} line {n}: expected '<index> <ClassName>', got {ln!r}")
        classes.append(parts[1])
    known = set(classes)
    out = []
    for kind in ("train", "test"):
        f = splits_dir / f"{kind}list{split:02d}.txt"
        if not f.is_file():
            raise UsageError(f"{f} not found: UCF101 has {kind}list01..03.txt; is --split {split} right?")
        rows = []
        for n, ln in enumerate(_read_lines(f), 1):
            rel = ln.split()[0].replace("\\", "/")
            cls = rel.split("/")[0] if "/" in rel else re.sub(r"^v_(.+)_g\d+_c\d+\.\w+$", r"\1", rel)
            if cls not in known:
                raise UsageError(f"{f} line {n}: class {cls!r} of {rel!r} is not in {ind}")
            rows.append((rel if "/" in rel else f"{cls}/{rel}", cls))
        out.append(rows)
    return out[0], out[1], classes


def _hmdb51(splits_dir: Path, split: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    pat = re.compile(rf"^(.+)_test_split{split}\.txt$")
    files = sorted(p for p in splits_dir.glob(f"*_test_split{split}.txt") if pat.match(p.name)) \
        if splits_dir.is_dir() else []
    if not files:
        raise UsageError(f"no <class>_test_split{split}.txt files in {splits_dir}: --splits must be HMDB51's "
                         f"testTrainMulti_7030_splits folder (split 1, 2 or 3)")
    train, test, classes = [], [], []
    for f in files:
        cls = pat.match(f.name).group(1)
        classes.append(cls)
        for n, ln in enumerate(_read_lines(f), 1):
            parts = ln.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise UsageError(f"{f} line {n}: expected '<video>.avi <0|1|2>', got {ln!r}")
            if parts[1] == "1":
                train.append((f"{cls}/{parts[0]}", cls))
            elif parts[1] == "2":
                test.append((f"{cls}/{parts[0]}", cls))
    return train, test, classes


def split_inputs(layout: str, root: str | os.PathLike, splits_dir: str | os.PathLike, split: int) -> Split:
    """The train/test inputs and labels of ``split`` (1-3) of ``layout`` (module docstring)."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if split not in (1, 2, 3):
        raise UsageError(f"--split must be 1, 2 or 3, got {split}")
    root, splits_dir = Path(root), Path(splits_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: the {layout} video folder does not exist")
    train, test, classes = (_ucf101 if layout == "ucf101" else _hmdb51)(splits_dir, split)
    by_name: dict[str, list[Path]] | None = None
    missing: list[str] = []

    def resolve(rows):
        nonlocal by_name
        found = []
        for rel, cls in rows:
            p = root / rel
            if not p.is_file():
                if by_name is None:
                    by_name = {}
                    for q in root.rglob("*"):
                        if q.is_file():
                            by_name.setdefault(q.name, []).append(q)
                hits = by_name.get(Path(rel).name, [])
                if len(hits) != 1:
                    missing.append(rel)
                    continue
                p = hits[0]
            found.append((str(p.resolve()), rel, cls))
        return found

    tr, te = resolve(train), resolve(test)
    if not tr and not te:
        raise UsageError(f"none of the {len(train) + len(test)} videos of {layout} split {split} is under {root} "
                         f"(e.g. {train[0][0] if train else test[0][0] if test else '?'}); give the folder that "
                         f"holds the class folders")
    labels = {rel: cls for _, rel, cls in tr + te}
    return Split(layout, split, [(p, rel) for p, rel, _ in tr], [(p, rel) for p, rel, _ in te], labels, classes,
                 missing)
