"""Small synthetic UCF101 / HMDB51 trees: the real folder layout, file names and split files,
filled with synthetic videos (``mohico synth OUT --layout ucf101|hmdb51``).

A class is a synthetic topic (:func:`mohico.datasets.synthetic.synth.synthesize_one`; palettes, textures
and object kinds), so the classes are learnable. Videos are VP9 remuxed into ``.avi``.

UCF101: ``OUT/UCF-101/<Class>/v_<Class>_gGG_cCC.avi`` and ``OUT/ucfTrainTestlist/`` with
``classInd.txt``, ``trainlist0N.txt`` (``<Class>/<file> <index>``) and ``testlist0N.txt``
(``<Class>/<file>``): video ``i`` of a class is group ``i % 3 + 1``, clip ``i // 3 + 1``; split N
tests group N (the real splits hold out 7 of 25 groups each).

HMDB51: ``OUT/hmdb51/<class>/<name>.avi`` (``<Subject>_<class>_u_cm_np1_fr_med_<i>.avi``) and
``OUT/testTrainMulti_7030_splits/<class>_test_split<N>.txt`` with ``<file> <m>`` lines, ``m``
= 1 train, 2 test, 0 unused: video ``i`` is a test video of split N when ``i % 3 == N - 1``, unused
when it is the last video of a class with more than 3, else train.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mohico.datasets.synthetic.synth import synthesize_one
from mohico.errors import UsageError
from mohico.utils import atomic_write_text

UCF_CLASSES = ("ApplyEyeMakeup", "Archery", "BabyCrawling", "Basketball", "BenchPress", "Biking", "Billiards",
               "BlowDryHair", "Bowling", "BoxingPunchingBag")
HMDB_CLASSES = ("brush_hair", "cartwheel", "catch", "chew", "clap", "climb", "dive", "draw_sword", "dribble", "drink")


def _remux_avi(src: Path, dst: Path) -> None:
    """Copy the video stream of ``src`` into an AVI container at ``dst`` (no re-encode)."""
    import av

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    with av.open(str(src)) as inp, av.open(str(tmp), "w", format="avi") as out:
        stream = inp.streams.video[0]
        ostream = out.add_stream_from_template(stream)
        for pkt in inp.demux(stream):
            if pkt.dts is None:
                continue
            pkt.stream = ostream
            out.mux(pkt)
    os.replace(tmp, dst)


def synth_benchmark(out: str | os.PathLike, layout: str, classes: int = 3, per_class: int = 6, seed: int = 0,
                    fps: int = 15, size: tuple[int, int] = (160, 120), duration: float = 4.0) -> dict:
    """Write the tree (module docstring); returns ``{"videos": root, "splits": split folder, "num_videos"}``."""
    if layout not in ("ucf101", "hmdb51"):
        raise UsageError(f"--layout must be ucf101 or hmdb51, got {layout!r}")
    names = UCF_CLASSES if layout == "ucf101" else HMDB_CLASSES
    if not 2 <= classes <= len(names):
        raise UsageError(f"--topics (classes) must be in [2, {len(names)}] for --layout {layout}, got {classes}")
    if per_class < 3:
        raise UsageError(f"--videos (per class with --layout) must be >= 3 so every split has train and test, got {per_class}")
    out = Path(out)
    root = out / ("UCF-101" if layout == "ucf101" else "hmdb51")
    splits = out / ("ucfTrainTestlist" if layout == "ucf101" else "testTrainMulti_7030_splits")
    splits.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for c in range(classes):
            cls = names[c]
            files[cls] = []
            for i in range(per_class):
                # video index j * classes + c has topic c (synthesize_one: topic = index % topics)
                src = synthesize_one(tmp, i * classes + c, seed, codec="vp9", fps=fps, size=size, duration=duration,
                                     topics=classes)
                if layout == "ucf101":
                    name = f"v_{cls}_g{i % 3 + 1:02d}_c{i // 3 + 1:02d}.avi"
                else:
                    name = f"Subject{i}_{cls}_u_cm_np1_fr_med_{i}.avi"
                _remux_avi(src, root / cls / name)
                files[cls].append(name)
    if layout == "ucf101":
        atomic_write_text(splits / "classInd.txt", "".join(f"{k + 1} {names[k]}\r\n" for k in range(classes)))
        for n in (1, 2, 3):
            train, test = [], []
            for k, cls in enumerate(names[:classes]):
                for name in files[cls]:
                    group = int(name.split("_g")[1][:2])
                    (test if (group - 1) % 3 == n - 1 else train).append((f"{cls}/{name}", k + 1))
            atomic_write_text(splits / f"trainlist{n:02d}.txt", "".join(f"{p} {k}\r\n" for p, k in train))
            atomic_write_text(splits / f"testlist{n:02d}.txt", "".join(f"{p}\r\n" for p, _ in test))
    else:
        for cls in names[:classes]:
            for n in (1, 2, 3):
                lines = []
                for i, name in enumerate(files[cls]):
                    mark = 2 if i % 3 == n - 1 else (0 if per_class > 3 and i == per_class - 1 else 1)
                    lines.append(f"{name} {mark} \n")
                atomic_write_text(splits / f"{cls}_test_split{n}.txt", "".join(lines))
    return {"videos": root, "splits": splits, "num_videos": classes * per_class}
