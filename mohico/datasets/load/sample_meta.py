"""What makes a raw shard sample usable for training: its json metadata and a video member.

    meta, ext = sample_meta(sample, name)   # sample: webdataset's {"__key__", "json": bytes, "webm": bytes, ...}

``meta`` is the sample's json with ``num_frames`` / ``width`` / ``height`` as int and ``fps`` as
float; ``ext`` the video member's extension (one of :data:`VIDEO_EXTS`). A sample without them
raises :class:`BadSample` (``reason``: the loader's skip counter). The loader worker checks every
sample with it (:func:`mohico.datasets.load.pipeline_worker.prepare_sample`), `mohico train
--dry-run` the first sample of each shard (:func:`mohico.datasets.load.loader_checks.shard_problem`;
only the video member's presence counts, never its bytes).
"""
from __future__ import annotations

import json

VIDEO_EXTS = ("webm", "mp4", "mkv", "avi", "mov")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def sample_meta(sample: dict, name: str) -> tuple[dict, str]:
    """``(meta, video extension)`` of raw ``sample`` (``name``: where it is, for the messages)."""
    try:
        meta = json.loads(sample["json"])
        for f in ("num_frames", "fps", "width", "height"):
            meta[f] = float(meta[f]) if f == "fps" else int(meta[f])
        if meta["num_frames"] < 1 or meta["fps"] <= 0:
            raise ValueError("num_frames/fps out of range")
    except KeyError as e:
        raise BadSample("bad_json", f"{name}: metadata json missing or lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise BadSample("bad_json", f"{name}: unreadable metadata json ({e})") from None
    ext = next((e for e in VIDEO_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_video", f"{name}: no video member ({'/'.join(VIDEO_EXTS)})")
    return meta, ext
