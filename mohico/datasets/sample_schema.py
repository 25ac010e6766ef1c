"""One shard sample as ``mohico shards`` writes it and every reader of a shard reads it: the
writer, the loader, evaluation, fine-tuning, ``mohico inspect`` and the shard geometry checks.

Members: a sample is the tar members ``{key}.{member}`` that share a key; the key ends at the first
dot of the member's base name (:func:`split_name`), the rest is the member (webdataset's key of
the sample dict):

- the video, one of :data:`VIDEO_EXTS` (the writer makes ``webm`` for vp9, ``mp4`` for h264;
  readers take the first of these a sample has);
- :data:`JSON_MEMBER` (``json``): the metadata, an object with at least :data:`META_FIELDS`
  (``num_frames``, ``fps``, ``width``, ``height``) and optionally ``source`` and ``label``
  (:func:`parse_meta` reads it);
- :data:`MOTION_MEMBER` (``motion.npy``): uint8 motion maps ``(num_frames, gh, gw)``.

Labels: a sample's label is its json ``label``, unless a labels dict (a labels file,
:func:`mohico.datasets.write.shards_inputs.load_labels`) names it: by source (exact, file name,
stem: :func:`label_for`), then by key (:func:`sample_label`). :func:`scan_labels` reads the labels
of whole shards from their json members only.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from mohico.datasets.shard_list import expand_shards
from mohico.errors import MohicoError

# The union of the lists the loader (webm, mp4, mkv, avi, mov), evaluation (webm, mkv, mp4) and
# inspect (webm, mp4, mkv) each had; in the loader's order.
VIDEO_EXTS = ("webm", "mp4", "mkv", "avi", "mov")
JSON_MEMBER = "json"
MOTION_MEMBER = "motion.npy"
META_FIELDS = ("num_frames", "fps", "width", "height")


def split_name(name: str) -> tuple[str, str]:
    """``"dir/abc.motion.npy"`` -> ``("dir/abc", "motion.npy")``: the key ends at the first dot of the
    basename (a name without one is all key: ``("dir/abc", "")``)."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def video_member(sample) -> Optional[str]:
    """The first of :data:`VIDEO_EXTS` that ``sample`` (a dict or set of member names) holds; None: no video."""
    return next((e for e in VIDEO_EXTS if e in sample), None)


def no_video_member(name: str) -> str:
    """The message for sample ``name`` without a video member (it lists :data:`VIDEO_EXTS`)."""
    return f"{name}: no video member ({'/'.join(VIDEO_EXTS)})"


def missing_meta_fields(meta) -> list[str]:
    """The :data:`META_FIELDS` that ``meta`` lacks (all of them when it is not a JSON object)."""
    return [f for f in META_FIELDS if not isinstance(meta, dict) or f not in meta]


def typed_meta(meta: dict, fields: Sequence[str] = META_FIELDS) -> dict:
    """A copy of ``meta`` with its ``fields`` (of :data:`META_FIELDS`) typed: ``num_frames``, ``width``,
    ``height`` int, ``fps`` float. Raises KeyError naming a missing field, ValueError / TypeError for one
    that is not a number (TypeError also when ``meta`` is not a dict)."""
    out = dict(meta)
    for f in fields:
        out[f] = float(meta[f]) if f == "fps" else int(meta[f])
    return out


def parse_meta(raw, fields: Sequence[str] = META_FIELDS) -> dict:
    """The metadata json member (bytes or str) as a dict with its ``fields`` typed (:func:`typed_meta`;
    a reader that needs fewer names just those). Raises ValueError (not JSON), TypeError (not an
    object, or a field of the wrong type) or KeyError (a field missing)."""
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise TypeError(f"the metadata json is a {type(meta).__name__}, not an object")
    return typed_meta(meta, fields)


def label_for(labels: dict, source: str):
    """Exact source name, then file name, then file stem."""
    for k in (source, Path(source).name, Path(source).stem):
        if k in labels:
            return labels[k]
    return None


def sample_label(labels: Optional[dict], source: str, key: str, default=None):
    """The label ``labels`` gives the sample of ``source`` (:func:`label_for`; an empty source
    matches nothing) or, failing that, of ``key``; ``default`` (the shard's own json label) when
    ``labels`` names neither or is empty."""
    if not labels:
        return default
    lab = label_for(labels, source) if source else None
    return lab if lab is not None else labels.get(key, default)


def json_members(url: str) -> Iterator[tuple[str, bytes]]:
    """``(key, json bytes)`` of every sample of the local tar ``url``, reading only the json members
    (the tar headers let it seek past the videos). Raises OSError / tarfile.TarError."""
    with tarfile.open(url) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, member = split_name(m.name)
            if member == JSON_MEMBER:
                yield key.rsplit("/", 1)[-1], tar.extractfile(m).read()


def scan_labels(shards, labels: Optional[dict] = None) -> dict[str, object]:
    """``{key: label}`` of every sample of ``shards`` (its json ``label``, or ``labels`` by source
    name / file name / stem / key: :func:`sample_label`), reading only the json members; unlabelled
    samples are absent."""
    out: dict[str, object] = {}
    for url in expand_shards(shards):
        try:
            for key, raw in json_members(url):
                meta = json.loads(raw)
                lab = sample_label(labels, str(meta.get("source", "")), key, meta.get("label"))
                if lab is not None:
                    out[key] = lab
        except (OSError, tarfile.TarError, ValueError) as e:
            raise MohicoError(f"{url}: cannot read the labels of the shard ({type(e).__name__}: {e})") from e
    return out
