"""Shard folders as `mohico train --dry-run` reads them, made in a few milliseconds: tars whose
samples have a json (``num_frames``, ``fps``, ``width``, ``height``) and a video member of a few
placeholder bytes (the dry run reads tar headers and json members only, never a video), and
optionally the ``manifest.json`` `mohico shards` writes beside them (its ``options.short_side``
and per-shard ``name`` / ``num_samples`` / ``bytes`` / ``samples``).

    fake_shards(folder, [[40, 40], [40]])                        # 2 shards: 2 and 1 videos of 40 frames
    paper_shards(folder)            # what the paper configs' dry runs accept at 4 nodes x 8 GPUs

A training run cannot decode these; tests that train use the session fixture ``synth_shards``.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

PLACEHOLDER_VIDEO = b"\x1a\x45\xdf\xa3"     # the WebM (EBML) magic, nothing after it


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_shards(folder: Path, frames: list[list[int]], fps: float = 15.0, size: tuple[int, int] = (96, 72),
                video: bool = True, manifest: bool = False, manifest_samples: int | None = None) -> Path:
    """``folder`` with one ``shard-NNNNNN.tar`` per list of ``frames`` (a video's frame count each)
    at ``fps`` and ``size`` (width, height); ``video=False`` leaves the video members out (json only);
    ``manifest`` (or ``manifest_samples``: the sample count it gives each shard) writes manifest.json."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    entries = []
    for n, shard in enumerate(frames):
        name = f"shard-{n:06d}.tar"
        keys = [f"{n:04d}{i:012x}" for i in range(len(shard))]
        with tarfile.open(folder / name, "w") as tar:
            for key, num in zip(keys, shard):
                meta = {"num_frames": num, "fps": fps, "width": size[0], "height": size[1]}
                _member(tar, f"{key}.json", json.dumps(meta).encode())
                if video:
                    _member(tar, f"{key}.webm", PLACEHOLDER_VIDEO)
        entries.append({"name": name, "num_samples": manifest_samples or len(shard), "samples": keys,
                        "bytes": (folder / name).stat().st_size, "num_frames": sum(shard)})
    if manifest or manifest_samples:
        (folder / "manifest.json").write_text(json.dumps({
            "format": "mohico-shards/1", "complete": True, "options": {"short_side": min(size), "fps": fps}, "shards": entries,
            "num_samples": sum(e["num_samples"] for e in entries), "num_shards": len(entries)}))
    return folder


def paper_shards(folder: Path) -> Path:
    """Shards the paper configs (configs/mcl_r2plus1d_k400.yaml: 224 px crops, 16 frames at stride 2
    of 30 fps) accept at 4 nodes x 8 GPUs x 4 loader workers: 502 px short side (`mohico shards
    --short-side 502`), 300-frame videos, 1000 samples per shard by the manifest (one in each tar)."""
    return fake_shards(folder, [[300], [300]], fps=30.0, size=(892, 502), manifest_samples=1000)
