"""Untrimmed videos -> WebDataset shards with motion maps (``mohico shards``).

One sample per video (contract: docs/ARCHITECTURE.md "Shards"):

- ``{key}.webm`` (vp9) or ``{key}.mp4`` (h264): canonical CFR re-encode, short side N, keyframe at
  least every ``gop`` frames, no B-frames (:mod:`mohico.datasets.write.transcode`);
- ``{key}.json``: ``source`` (path relative to SRC, or as written in the list file), ``sha256`` of
  the source file, ``fps``, ``num_frames``, ``width``, ``height``, ``duration`` (num_frames / fps),
  ``codec``, ``gop``, ``label``, ``motion`` (``scale``, ``grid [gh, gw]``, ``stride``, ``pool``,
  ``method``, ``border``, ``window``, ``percentile``, ``cut_fraction``), ``tmotion`` (per-frame
  T-motion floats), ``cuts`` (first frame of each detected shot cut),
  ``source_info`` (source fps, vfr, size, codec, duration);
- ``{key}.motion.npy``: uint8 ``(num_frames, gh, gw)``; magnitude = value / 255 * scale
  (:mod:`mohico.datasets.write.motion`).

Keys are the first 16 hex digits of sha1(source). Inputs are processed in sorted order and packed
sequentially: a shard is closed when the next sample would push it past ``max_shard_size``, so
the assignment of videos to shards is a pure function of the inputs and options. Each shard is
written as ``shard-NNNNNN.tar.tmp``, its ``.idx`` (DALI wds2idx format) written, then renamed to
``.tar``, then ``manifest.json`` (atomic) records it. The manifest doubles as the resume journal:
a re-run with the same inputs and options keeps the recorded shards and continues at the first
input of the first unrecorded shard, so interrupted + resumed == uninterrupted, byte for byte.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import time
from collections import deque
from pathlib import Path

import numpy as np

from mohico.datasets.sample_schema import JSON_MEMBER, MOTION_MEMBER, label_for
from mohico.datasets.write.motion import (CUT_FRACTION, FLOW_METHODS, SCALE_PERCENTILE, MotionMapper, make_flow,
                                          quantise)
from mohico.datasets.write.shard_defaults import (DEFAULT_CODEC, DEFAULT_FLOW, DEFAULT_FPS,  # noqa: F401
                                                  DEFAULT_GOP, DEFAULT_MAX_SHARD_SIZE, DEFAULT_MIN_FRAMES,
                                                  DEFAULT_SHORT_SIDE)
from mohico.datasets.write.shards_inputs import (check_labels, file_sha256, list_inputs, load_labels,  # noqa: F401
                                                 sample_key)
from mohico.datasets.write.shards_tar import ShardTar, index_text
from mohico.datasets.write.transcode import CODECS, SkipVideo, transcode
from mohico.errors import MohicoError, UsageError
from mohico.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "mohico-shards/1"
MOTION_STRIDE = 8
MOTION_BORDER = 8
SHARD_NAME = "shard-{:06d}"


# ----------------------------------------------------------------------------- one video
def make_sample(task: dict) -> dict:
    """Transcode one video and compute its motion maps. Never raises for bad input: returns
    ``{"input", "source", "key", "skip": reason | None, "files": [(name, bytes)], "frames"}``."""
    o = task["options"]
    res = {"input": task["input"], "source": task["source"], "key": task["key"], "skip": None, "files": [], "frames": 0}
    try:
        mm = MotionMapper(o["flow"], MOTION_STRIDE, MOTION_BORDER)
        tc = transcode(task["path"], o["codec"], o["short_side"], o["fps"], o["gop"], on_frame=mm.push)
        if tc.num_frames < o["min_frames"]:
            raise SkipVideo(f"too short: {tc.num_frames} frames at {o['fps']} fps < min_frames {o['min_frames']}")
        if tc.height < 2 * MOTION_STRIDE or tc.width < 2 * MOTION_STRIDE:
            raise SkipVideo(f"frame {tc.width}x{tc.height} is too small for motion maps")
        maps, tmotion = mm.finish()
        q, scale = quantise(maps)
        sha = file_sha256(task["path"])
    except SkipVideo as e:
        res["skip"] = str(e)
        return res
    except MemoryError:
        raise
    except Exception as e:   # an unexpected decoder/encoder failure on this input: skip, keep its reason
        res["skip"] = f"failed: {e.__class__.__name__}: {e}"
        return res
    key = task["key"]
    meta = {
        "key": key, "source": task["source"], "sha256": sha, "fps": tc.fps, "num_frames": tc.num_frames,
        "width": tc.width, "height": tc.height, "duration": tc.num_frames / tc.fps, "codec": o["codec"],
        "gop": o["gop"], "label": task["label"],
        "motion": {"scale": scale, "grid": [int(q.shape[1]), int(q.shape[2])], "stride": MOTION_STRIDE,
                   "pool": "mean", "method": o["flow"], "border": MOTION_BORDER, "window": 1,
                   "percentile": SCALE_PERCENTILE, "cut_fraction": CUT_FRACTION},
        "cuts": mm.cuts,
        "tmotion": [float(f"{x:.6g}") for x in tmotion],
        "source_info": {"fps": round(tc.source_fps, 4), "vfr": tc.source_vfr, "width": tc.source_width,
                        "height": tc.source_height, "codec": tc.source_codec,
                        "duration": round(tc.source_duration, 4)},
    }
    npy = io.BytesIO()
    np.save(npy, q, allow_pickle=False)
    res["files"] = [(f"{key}.{tc.ext}", tc.data),
                    (f"{key}.{JSON_MEMBER}", json.dumps(meta, sort_keys=True).encode()),
                    (f"{key}.{MOTION_MEMBER}", npy.getvalue())]
    res["frames"] = tc.num_frames
    return res


def _init_worker():
    import cv2

    cv2.setNumThreads(1)


def _results(tasks: list[dict], workers: int):
    """Yield :func:`make_sample` results in task order, at most ``2 * workers`` videos in flight."""
    if workers <= 1:
        for t in tasks:
            yield make_sample(t)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, maxtasksperchild=50) as pool:
        pending: deque = deque()
        it = iter(tasks)
        for t in it:
            pending.append(pool.apply_async(make_sample, (t,)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            r = pending.popleft().get()
            t = next(it, None)
            if t is not None:
                pending.append(pool.apply_async(make_sample, (t,)))
            yield r


# ----------------------------------------------------------------------------- writer
def parse_size(text: str | int) -> int:
    """``"1GB"``, ``"600kB"``, ``"1.5GiB"``, ``"600000"`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise UsageError(f"bad size {text!r}: use e.g. 1GB, 500MB, 600kB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _finish_stats(man: dict) -> dict:
    man["num_samples"] = sum(s["num_samples"] for s in man["shards"])
    man["num_shards"] = len(man["shards"])
    man["num_skipped"] = len(man["skipped"])
    man["total_frames"] = sum(s["num_frames"] for s in man["shards"])
    man["total_hours"] = man["total_frames"] / man["options"]["fps"] / 3600.0
    return man


def write_shards(src, out, codec: str = DEFAULT_CODEC, short_side: int = DEFAULT_SHORT_SIDE, fps: int = DEFAULT_FPS,
                 gop: int = DEFAULT_GOP, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, workers: int = 1,
                 flow: str = DEFAULT_FLOW, progress: bool = False, labels=None,
                 min_frames: int = DEFAULT_MIN_FRAMES) -> dict:
    """Write (or resume writing) shards of the videos in ``src`` to folder ``out``; returns the manifest.
    The defaults are `mohico shards`'s (``workers``: 1 here, the CPU count on the command line).

    ``labels``: a dict ``{source: label}`` or a labels file path (see :func:`load_labels`).
    Raises :class:`MohicoError` if ``out`` holds shards written with other inputs or options.
    """
    if codec not in CODECS:
        raise UsageError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if flow not in FLOW_METHODS:
        raise UsageError(f"flow must be one of {', '.join(FLOW_METHODS)}, got {flow!r}")
    make_flow(flow)   # fail now (e.g. tvl1 without opencv-contrib), not once per video
    if short_side < 2 * MOTION_STRIDE or short_side % 2:
        raise UsageError(f"short_side must be even and >= {2 * MOTION_STRIDE}, got {short_side}")
    if fps < 1 or gop < 1 or min_frames < 1:
        raise UsageError("fps, gop and min_frames must be >= 1")
    max_shard_size = parse_size(max_shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = list_inputs(src, exclude=out)
    label_map = labels if isinstance(labels, dict) else load_labels(labels)
    if labels is not None:
        check_labels(label_map, [s for _, s in inputs], "(a dict)" if isinstance(labels, dict) else str(labels))
    options = {"codec": codec, "short_side": short_side, "fps": fps, "gop": gop, "max_shard_size": max_shard_size,
               "flow": flow, "min_frames": min_frames, "motion_stride": MOTION_STRIDE, "motion_border": MOTION_BORDER,
               "labels_sha256": hashlib.sha256(json.dumps(label_map, sort_keys=True, default=str).encode()).hexdigest()}
    inputs_sha = hashlib.sha256("\n".join(s for _, s in inputs).encode()).hexdigest()
    man = _resume_or_start(out, options, len(inputs), inputs_sha)
    if man["complete"]:
        log.info("%s: already complete (%d samples in %d shards)", out, man["num_samples"], man["num_shards"])
        return man

    start = man["next_input"]
    tasks = [{"input": i, "path": p, "source": s, "key": sample_key(s), "label": label_for(label_map, s),
              "options": options} for i, (p, s) in enumerate(inputs) if i >= start]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), initial=start, unit="video", desc="shards", dynamic_ncols=True)
    t_start, frames_done = time.perf_counter(), 0

    shard: ShardTar | None = None
    shard_first = start
    shard_keys: list[str] = []
    shard_frames = 0
    seen_keys = {k for s in man["shards"] for k in s["samples"]}

    def close_shard(next_input: int):
        nonlocal shard, shard_keys, shard_frames
        n = len(man["shards"])
        name = SHARD_NAME.format(n)
        size = shard.close()
        atomic_write_text(out / f"{name}.idx", index_text(shard.samples))
        os.replace(shard.path, out / f"{name}.tar")
        man["shards"].append({"name": f"{name}.tar", "index": f"{name}.idx", "inputs": [shard_first, next_input],
                              "samples": shard_keys, "num_samples": len(shard_keys), "num_frames": shard_frames,
                              "bytes": size})
        man["next_input"] = next_input
        atomic_write_json(out / "manifest.json", _finish_stats(man))
        shard, shard_keys, shard_frames = None, [], 0

    try:
        for r in _results(tasks, workers):
            i = r["input"]
            if r["skip"] is None and r["key"] in seen_keys:
                r["skip"] = f"duplicate key {r['key']}"
            if r["skip"] is not None:
                man["skipped"].append({"input": i, "source": r["source"], "reason": r["skip"]})
                log.warning("skipped %s: %s", r["source"], r["skip"])
            else:
                if shard is not None and shard.num_samples and shard.projected_size(r["files"]) > max_shard_size:
                    close_shard(i)
                if shard is None:   # a shard covers inputs [next_input at its start, next_input at its close)
                    shard_first = man["next_input"]
                    shard = ShardTar(out / f"{SHARD_NAME.format(len(man['shards']))}.tar.tmp")
                shard.add_sample(r["files"])
                shard_keys.append(r["key"])
                seen_keys.add(r["key"])
                shard_frames += r["frames"]
                frames_done += r["frames"]
            if bar is not None:
                el = max(time.perf_counter() - t_start, 1e-6)
                bar.set_postfix(frames_per_s=f"{frames_done / el:.0f}", skipped=len(man["skipped"]))
                bar.update(1)
        if shard is not None:
            close_shard(len(inputs))
        man["next_input"] = len(inputs)
        man["complete"] = True
        atomic_write_json(out / "manifest.json", _finish_stats(man))
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return man


def _resume_or_start(out: Path, options: dict, num_inputs: int, inputs_sha: str) -> dict:
    """Load the journal in ``out`` and clean up after an interruption, or start a new one."""
    path = out / "manifest.json"
    if path.exists():
        try:
            man = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MohicoError(f"{path} is unreadable ({e}): delete {out} (or write to a new folder) and re-run") from None
        if man.get("format") != FORMAT:
            raise MohicoError(f"{path} is not a mohico shards manifest ({man.get('format')!r}): use a new output folder")
        diff = [k for k in options if man["options"].get(k) != options[k]]
        if diff:
            raise MohicoError(f"{out} was written with other options ({', '.join(diff)} differ): "
                              f"use a new output folder, or delete {out} to rewrite it")
        if man["inputs"]["sha256"] != inputs_sha:
            raise MohicoError(f"the input videos changed since {out} was written ({man['inputs']['count']} then, "
                              f"{num_inputs} now): use a new output folder, or delete {out} to rewrite it")
        for s in man["shards"]:
            if not (out / s["name"]).exists() or (out / s["name"]).stat().st_size != s["bytes"] or not (out / s["index"]).exists():
                raise MohicoError(f"{out / s['name']} is missing or has the wrong size: delete {out} and re-run")
        if man["complete"]:
            return man
        man["skipped"] = [s for s in man["skipped"] if s["input"] < man["next_input"]]
        done = {s["name"] for s in man["shards"]} | {s["index"] for s in man["shards"]}
        for p in out.glob("shard-*"):   # partial or unrecorded shards: rewritten identically below
            if p.name not in done:
                p.unlink()
        if man["shards"] or man["next_input"]:
            log.info("%s: resuming at input %d after %d complete shards", out, man["next_input"], len(man["shards"]))
        return man
    if any(out.glob("shard-*")):
        raise MohicoError(f"{out} holds shard files but no manifest.json: use a new output folder")
    man = {"format": FORMAT, "complete": False, "options": options,
           "inputs": {"count": num_inputs, "sha256": inputs_sha}, "next_input": 0, "shards": [], "skipped": []}
    atomic_write_json(path, _finish_stats(man))
    return man
