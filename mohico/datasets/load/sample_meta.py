"""What makes a raw shard sample usable for training: its json metadata and a video member.

    meta, ext = sample_meta(sample, name)   # sample: webdataset's {"__key__", "json": bytes, "webm": bytes, ...}

``meta`` is the sample's json with ``num_frames`` / ``width`` / ``height`` as int and ``fps`` as
float; ``ext`` the video member's extension (one of :data:`mohico.datasets.sample_schema.VIDEO_EXTS`). A sample without them
raises :class:`BadSample` (``reason``: the loader's skip counter). The loader worker checks every
sample with it (:func:`mohico.datasets.load.pipeline_worker.prepare_sample`), `mohico train
--dry-run` the first sample of each shard (:func:`mohico.datasets.load.loader_checks.shard_problem`;
only the video member's presence counts, never its bytes).
"""
from __future__ import annotations

from mohico.datasets.sample_schema import JSON_MEMBER, no_video_member, parse_meta, video_member


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, msg: str):
        super().__init__(msg)
        self.reason = reason


def sample_meta(sample: dict, name: str) -> tuple[dict, str]:
    """``(meta, video extension)`` of raw ``sample`` (``name``: where it is, for the messages)."""
    try:
        meta = parse_meta(sample[JSON_MEMBER])
        if meta["num_frames"] < 1 or meta["fps"] <= 0:
            raise ValueError("num_frames/fps out of range")
    except KeyError as e:
        raise BadSample("bad_json", f"{name}: metadata json missing or lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise BadSample("bad_json", f"{name}: unreadable metadata json ({e})") from None
    ext = video_member(sample)
    if ext is None:
        raise BadSample("missing_video", no_video_member(name))
    return meta, ext
