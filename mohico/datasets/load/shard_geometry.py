"""Start-up check that the shards' resolution can serve the config's crops without upsampling.

A crop of ``data.crop_size`` pixels cut from a box smaller than that is an upsampling, not a crop.
The smallest box the sampler draws has ``sampling.crop_area[0]`` of the frame's area at the worst
aspect of ``sampling.crop_aspect`` (:func:`mohico.datasets.load.crops.min_crop_side`), so the shards'
short side must be at least :func:`required_short_side`. The loader calls
:func:`check_crop_resolution` before it starts its workers and fails with the ``mohico shards``
command that fixes it.

The short side is read from the shards' ``manifest.json`` (``options.short_side``, written by
``mohico shards`` next to the tars) or, without one, from the first sample's json (``width``,
``height``) of the first shard.
"""
from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from typing import Optional, Sequence

from mohico.datasets.load.crops import min_crop_side
from mohico.datasets.load.pipeline_stream import iter_shard
from mohico.datasets.load.sampling import clip_span, video_stride
from mohico.datasets.sample_schema import JSON_MEMBER, json_members, parse_meta
from mohico.errors import ConfigError


def required_short_side(crop_size: int, area: Sequence[float], aspect: Sequence[float]) -> int:
    """The smallest even short side whose smallest crop box is at least ``crop_size`` pixels."""
    factor = min_crop_side(1.0, area, aspect)
    n = int(math.ceil(crop_size / factor - 1e-9))
    while min_crop_side(n, area, aspect) < crop_size - 1e-9:      # float safety
        n += 1
    return n + (n % 2)


def shards_short_side(urls: Sequence[str]) -> Optional[tuple[int, str]]:
    """``(short side in pixels, where it was read)`` for the first shard, or None if unknown
    (a remote shard without a local manifest and no readable sample json)."""
    first = str(urls[0])
    manifest = Path(first).parent / "manifest.json"
    if "://" not in first and manifest.is_file():
        try:
            side = int(json.loads(manifest.read_text())["options"]["short_side"])
            return side, str(manifest)
        except (KeyError, ValueError, TypeError, OSError):
            pass                                    # fall back to the first sample's json
    for sample in iter_shard(first):
        if JSON_MEMBER not in sample:
            continue
        try:
            meta = parse_meta(sample[JSON_MEMBER], ("width", "height"))
            return min(meta["width"], meta["height"]), f"{first}:{sample['__key__']}"
        except (KeyError, ValueError, TypeError):
            continue
    return None


def check_crop_resolution(data, sampling, urls: Sequence[str]) -> None:
    """Raise :class:`ConfigError` when the shards' short side is too small for ``data.crop_size``
    at the smallest crop ``sampling.crop_area[0]`` (``data``/``sampling``: DataConfig/SamplingConfig)."""
    found = shards_short_side(urls)
    if found is None:
        return
    side, where = found
    smallest = min_crop_side(side, sampling.crop_area, sampling.crop_aspect)
    if smallest + 1e-9 >= data.crop_size:
        return
    need = required_short_side(data.crop_size, sampling.crop_area, sampling.crop_aspect)
    raise ConfigError(
        f"'data.crop_size': {data.crop_size} px crops need shards with a short side of at least {need} px, "
        f"but {where} says {side}: the smallest crop box (sampling.crop_area[0] = {sampling.crop_area[0]} of "
        f"the frame, aspect {sampling.crop_aspect}) is only {smallest:.0f} px, so it would be upsampled. "
        f"Rewrite the shards with `mohico shards SRC OUT --short-side {need}` (and the same --fps), or lower "
        f"data.crop_size to {int(smallest)} or raise sampling.crop_area[0]")


def video_lengths(urls: Sequence[str], max_shards: int = 8) -> tuple[list[tuple[int, float]], int]:
    """``([(num_frames, fps) of every sample json], shards read)`` of the first ``max_shards``
    local tar shards (remote or unreadable ones are passed over). Reads the json members only
    (the tar headers let it seek past the videos)."""
    out, read = [], 0
    for url in list(urls)[:max_shards]:
        if not Path(url).is_file():
            continue
        try:
            for _, raw in json_members(url):
                try:
                    meta = parse_meta(raw, ("num_frames", "fps"))
                    out.append((meta["num_frames"], meta["fps"]))
                except (KeyError, ValueError, TypeError):
                    continue
            read += 1
        except (tarfile.TarError, OSError):
            continue
    return out, read


def clip_length_problem(data, urls: Sequence[str], max_shards: int = 8) -> Optional[tuple[str, str]]:
    """``("error" | "warning", message)`` when videos of ``urls`` are shorter than a clip of
    ``data.clip_len`` frames at ``data.frame_stride`` (the sampler then repeats their last frame):
    an error when every video of every shard is (all read), a warning when every video read or
    some are; None when all are long enough or none could be read."""
    lengths, read = video_lengths(urls, max_shards)
    if not lengths:
        return None
    spans = [clip_span(data.clip_len, video_stride(data.frame_stride, data.reference_fps, fps)) for _, fps in lengths]
    short = [(n, s) for (n, _), s in zip(lengths, spans) if n < s]
    if not short:
        return None
    lo, hi = min(s for _, s in short), max(s for _, s in short)
    span = f"{lo} frames" if lo == hi else f"{lo}-{hi} frames"
    clip = (f"a clip of data.clip_len={data.clip_len} frames at data.frame_stride={data.frame_stride}"
            + (f" (at data.reference_fps={data.reference_fps})" if data.reference_fps > 0 else "") + f" spans {span}")
    where = "of the shards" if read == len(urls) else f"in the first {read} of {len(urls)} shards"
    fix = ("Lower data.clip_len or data.frame_stride, or write the shards from longer videos")
    if len(short) == len(lengths):
        longest = max(n for n, _ in lengths)
        msg = (f"'data.clip_len': {clip}, but every one of the {len(lengths)} videos {where} is shorter (longest: "
               f"{longest} frames): every clip would repeat its last frame to fill up. {fix}")
        return ("error" if read == len(urls) else "warning"), msg
    return "warning", (f"'data.clip_len': {clip}; {len(short)} of the {len(lengths)} videos {where} are shorter: "
                       f"their clips repeat their last frame to fill up. {fix} if that matters")
