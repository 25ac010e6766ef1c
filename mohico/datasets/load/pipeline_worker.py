"""Loader worker: read -> sample -> remux (or PyAV-decode) whole batches, with their state.

Runs inside torch DataLoader workers (or in-process with ``num_workers=0``). Each worker owns one
*logical* stream; the k-th item of logical worker ``l`` is the loader's item
``g = base + (l - base) % W + k * W``, which the DataLoader hands out round-robin. Every item
carries the worker's stream state and counters after producing it, so the main process always
knows the exact state behind each batch it has handed to the trainer.
"""
from __future__ import annotations

import functools
import io
import multiprocessing as mp
from dataclasses import dataclass

import numpy as np

from mohico.datasets.load.loader_checks import BadRun
from mohico.datasets.load.pipeline_cpu import transform_clip
from mohico.datasets.load.pipeline_stream import SampleStream
from mohico.datasets.load.remux import DALI_CPU_CODECS, ClipRemuxer, decode_frames
from mohico.datasets.load.sample_meta import BadSample, sample_meta
from mohico.datasets.load.sampling import ClipSampler, sample_rng, stable_hash
from mohico.datasets.sample_schema import JSON_MEMBER, MOTION_MEMBER, parse_meta
from mohico.errors import MohicoError


class ProgressSchedule:
    """Training progress per loader item, shared with the workers.

    ``set(G, p)`` means "items ``g >= G`` use progress ``p``". The loader calls it with
    ``G = items consumed + lookahead``, where ``lookahead`` exceeds the items the DataLoader can
    have in flight, so no batch ever sees a value that was written after it started: the
    progress a batch uses depends only on when the trainer called ``set_progress``, never on
    timing. A ring of the last ``size`` item indices keeps it O(1).
    """

    def __init__(self, size: int, initial: float = 0.0):
        self.size = int(size)
        self._g = mp.Array("q", [-1] * self.size, lock=False)
        self._p = mp.Array("d", [0.0] * self.size, lock=False)
        self._last = mp.Value("q", -1, lock=False)
        self._initial = mp.Value("d", float(initial), lock=False)

    def set(self, G: int, p: float) -> None:
        last = self._last.value
        prev = self.get(last) if last >= 0 else self._initial.value
        for k in range(max(last + 1, G - self.size + 1), G):
            self._g[k % self.size], self._p[k % self.size] = k, prev
        self._p[G % self.size] = float(p)
        self._g[G % self.size] = G
        self._last.value = max(last, G)

    def get(self, g: int) -> float:
        last = self._last.value
        if last < 0:
            return self._initial.value
        k = min(g, last)
        if self._g[k % self.size] == k:
            return self._p[k % self.size]
        return self._initial.value if k < last - self.size else self._p[last % self.size]

    def state_dict(self) -> dict:
        last = self._last.value
        entries = [[k, self._p[k % self.size]] for k in range(max(0, last - self.size + 1), last + 1)
                   if self._g[k % self.size] == k]
        return {"initial": self._initial.value, "entries": entries}

    def load_state_dict(self, state: dict) -> None:
        self._initial.value = float(state["initial"])
        self._last.value = -1
        for i in range(self.size):
            self._g[i] = -1
        for k, p in state["entries"]:
            self.set(int(k), float(p))


@dataclass
class WorkerSpec:
    """Everything a worker needs (plain, picklable)."""
    urls: list
    seed: int
    rank: int
    world_size: int
    workers: int                 # logical workers per rank (>= 1)
    batch_size: int
    shuffle_buffer: int
    resampled: bool
    data: object                 # DataConfig
    sampling: object             # SamplingConfig
    mcl: bool
    hico: bool
    views: int                   # clips per video: cfg.objectives.num_views (what the sampler draws)
    device: str                  # "cpu" | "gpu": where DALI runs
    decoder: str                 # "auto" | "dali" | "pyav"


def uses_dali(spec: WorkerSpec, codec: str) -> bool:
    if spec.decoder == "pyav":
        return False
    if spec.decoder == "dali":
        return True
    return spec.device == "gpu" or codec in DALI_CPU_CODECS


def prepare_sample(sample: dict, spec: WorkerSpec, sampler: ClipSampler, progress: float) -> dict:
    """Validate one raw sample, draw its views, remux (DALI) or decode+transform (PyAV) them."""
    key = sample["__key__"]
    name = f"{sample.get('__url__', '?')}:{key}"
    meta, ext = sample_meta(sample, name)
    motion = None
    if MOTION_MEMBER in sample:
        try:
            motion = np.load(io.BytesIO(sample[MOTION_MEMBER]), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises several types on bad bytes
            raise BadSample("bad_motion", f"{name}: unreadable motion.npy ({e})") from None
        if motion.ndim != 3 or motion.dtype != np.uint8 or motion.shape[0] < 1:
            raise BadSample("bad_motion", f"{name}: motion.npy must be uint8 (N, gh, gw), got "
                                          f"{motion.dtype} {motion.shape}")
        grid = (meta.get("motion") or {}).get("grid") if isinstance(meta.get("motion"), dict) else None
        if motion.shape[0] != meta["num_frames"] or (grid is not None and list(motion.shape[1:]) != list(grid)):
            raise BadSample("bad_motion", f"{name}: motion.npy is {motion.shape}, but the json says "
                                          f"{meta['num_frames']} frames on a {grid or '?'} grid")
    elif spec.mcl:
        raise BadSample("missing_motion", f"{name}: no motion.npy member")
    rng = sample_rng(spec.seed, sample["__epoch__"], spec.rank, key, sample.get("__draw__", 0))
    draw = sampler.sample(meta, motion, rng, progress)
    clips = []
    try:
        with ClipRemuxer(sample[ext], meta["fps"], name) as rem:
            dali = uses_dali(spec, rem.codec)
            for v in range(draw.frames.shape[0]):
                fr = draw.frames[v]
                cut = rem.cut(int(fr.min()), int(fr.max()))
                rel = (fr - cut.key_frame).astype(np.int32)
                clip = {"data": cut.data, "frames": rel, "box": tuple(int(b) for b in draw.boxes[v]),
                        "aug": draw.augment[v]}
                if not dali:
                    frames = decode_frames(cut.data, rel, name)
                    clip = {"tensor": transform_clip(frames, clip["box"], clip["aug"], spec.data.crop_size,
                                                     spec.data.mean, spec.data.std), **clip}
                    del clip["data"]
                clips.append(clip)
    except MohicoError as e:
        raise BadSample("bad_video", str(e)) from None
    return {"key": key, "video_id": stable_hash(key) >> 1, "clips": clips, "motion": draw.motion,
            "boxes": draw.boxes.astype(np.float32), "frames": draw.frames,
            "crop_motion": np.array([m == "motion" for m in draw.crop_methods]),
            "flip": np.array([a["flip"] for a in draw.augment]), "progress": progress}


def draws_per_read(sample: dict, samples_per_read: int, seconds_per_sample: float) -> int:
    """How many samples one read of ``sample`` yields (``data.samples_per_read`` R, and with
    ``data.seconds_per_sample`` S > 0: ``min(R, ceil(duration / S))``, at least 1; the duration
    is ``num_frames / fps`` from the sample's json, 1 draw if that is unreadable: the sample is
    then skipped once, not R times)."""
    R = int(samples_per_read)
    if R <= 1 or seconds_per_sample <= 0:
        return max(R, 1)
    try:
        meta = parse_meta(sample[JSON_MEMBER], ("num_frames", "fps"))
        duration = meta["num_frames"] / meta["fps"]
    except Exception:  # noqa: BLE001 - bad json: prepare_sample counts it
        return 1
    if not np.isfinite(duration) or duration <= 0:
        return 1
    return int(min(R, max(1, np.ceil(duration / float(seconds_per_sample) - 1e-9))))


def worker_items(spec: WorkerSpec, logical: int, state, start_epoch: int, first_item: int,
                 schedule: ProgressSchedule, counters: dict):
    """Yield this logical worker's items forever (a finite stream then yields ``done`` markers)."""
    W = spec.workers
    d = spec.data
    draws = None
    if d.samples_per_read > 1:
        draws = functools.partial(draws_per_read, samples_per_read=d.samples_per_read,
                                  seconds_per_sample=d.seconds_per_sample)
    stream = SampleStream(spec.urls, spec.seed, spec.rank * W + logical, spec.world_size * W,
                          spec.shuffle_buffer, spec.resampled, draws)
    if state is not None:
        stream.load_state_dict(state)
        counters["lost_on_restore"] = counters.get("lost_on_restore", 0) + stream.lost_on_restore
    elif start_epoch:
        stream._reset(start_epoch)
    sampler = ClipSampler(spec.sampling, spec.data, spec.mcl, spec.hico, spec.views)
    g = first_item
    errors_seen = bytes_seen = 0
    bad = BadRun()
    while True:
        progress = schedule.get(g)
        batch, done, in_batch = [], False, set()
        while len(batch) < spec.batch_size:
            sample = stream.next(in_batch)     # keeps a video's R draws out of one batch (bound: stream doc)
            new_errors = stream.read_errors[errors_seen:]
            if new_errors:
                errors_seen = len(stream.read_errors)
                counters["read_error"] = counters.get("read_error", 0) + len(new_errors)
                counters["last_error"] = new_errors[-1]
            if sample is None:
                done = True
                break
            in_batch.add(sample["__ref__"])
            try:
                batch.append(prepare_sample(sample, spec, sampler, progress))
                bad.good()
                for reason, n in sampler.counts.items():      # draws that fell back (e.g. mcl_short_video)
                    counters[reason] = counters.get(reason, 0) + n
                sampler.counts.clear()
                continue
            except BadSample as e:
                counters[e.reason] = counters.get(e.reason, 0) + 1
                counters["skipped"] = counters.get("skipped", 0) + 1
                counters["last_error"] = str(e)
            except Exception as e:  # noqa: BLE001 - odd metadata must not kill a week-long run
                counters["bad_other"] = counters.get("bad_other", 0) + 1
                counters["skipped"] = counters.get("skipped", 0) + 1
                counters["last_error"] = (f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}: "
                                          f"{type(e).__name__}: {e}")
            why = bad.failed(sample.get("__epoch__", 0))
            if why:
                while True:
                    yield {"logical": logical, "g": g, "state": stream.state_dict(), "counters": dict(counters),
                           "fatal": why}
        counters["bytes_read"] = counters.get("bytes_read", 0) + stream.bytes_read - bytes_seen
        bytes_seen = stream.bytes_read
        item = {"logical": logical, "g": g, "state": stream.state_dict(), "counters": dict(counters)}
        if done:     # a finite epoch ended: the partial batch is dropped, never shrunk
            counters["dropped_last"] = counters.get("dropped_last", 0) + len(batch)
            item["counters"] = dict(counters)
            while True:
                yield {**item, "done": True}
        yield {**item, "samples": batch}
        g += W
