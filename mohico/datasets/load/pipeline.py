"""The training data loader: shards -> sampler -> remuxed GOPs -> DALI -> ClipBatch.

    loader = build_loader(cfg, "shards/shard-{000000..000099}.tar", rank, world_size)
    loader.set_progress(step / max_steps)        # HiCo's gradual delta_max (trainer -> sampler)
    batch = next(iter(loader))
    loader.state_dict() / loader.load_state_dict(sd)   # exact resume (save per rank)
    loader.stats()                               # skipped samples, read errors, data wait

Work split: torch DataLoader workers (``data.num_workers``) read the tars with webdataset, run
the sampler (:mod:`mohico.datasets.load.sampling`) and remux each clip's GOPs with PyAV
(:mod:`mohico.datasets.load.remux`); the main process decodes, crops, resizes, augments and normalises
them with DALI (:mod:`mohico.datasets.load.dali_decode`, device ``"mixed"`` on a GPU, ``"cpu"``
otherwise). Codecs the local DALI backend cannot decode (H.264 without a GPU) are decoded with
PyAV in the workers and transformed by the numpy twin of the DALI graph
(:mod:`mohico.datasets.load.pipeline_cpu`), with the same sampling. Workers start through the
``forkserver`` context: forking the main process after DALI has started its threads hung the
children in tests.

Each batch is a :class:`mohico.datasets.load.batch.ClipBatch` (its docstring gives every field's
shape and dtype) with B = data.batch_size, V = ``cfg.objectives.num_views`` (2 with only MCL, 3
when HiCo is on), T = data.clip_len, S = data.crop_size, M = data.motion_size.

Exact resume: the state holds, per logical worker, its stream state after the last batch the
trainer received, plus the item counter and the progress schedule; after ``load_state_dict`` at
the same world size and ``num_workers`` the batches continue exactly as without interruption
(all random draws are functions of ``(seed, epoch, rank, key)`` and the stream state). At a
different world size or worker count the streams are re-split: every stream restarts at the
start of the *oldest* epoch any saved stream was in (no sample of that epoch is lost; samples
already seen in it may be seen again); skip/error counters carry over.

Bad data (unreadable json, missing or bad video/motion member, truncated tar) is skipped in the
worker and counted (``stats()``); a batch is always full (the worker reads on). A clip that
fails in DALI despite passing the remux is decoded with PyAV instead (``dali_fallback``); if
that fails too, the sample is replaced by another sample of the same batch (``duplicated``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional, Sequence, Union

import numpy as np
from torch.utils.data import IterableDataset

from mohico.config_validate import shuffle_buffer_advice
from mohico.datasets.load.batch import ClipBatch
from mohico.datasets.load.loader_checks import loader_start_problems, no_usable_data_message
from mohico.datasets.load.loader_workers import worker_process_options
from mohico.datasets.shard_list import expand_shards
from mohico.datasets.load.pipeline_worker import ProgressSchedule, WorkerSpec, worker_items
from mohico.errors import ConfigError, MohicoError

STATE_VERSION = 1
PREFETCH = 2
COUNTERS = ("skipped", "bad_json", "bad_video", "bad_motion", "missing_motion", "missing_video", "bad_other",
            "read_error", "lost_on_restore", "dropped_last", "dali_fallback", "duplicated", "bytes_read")


def _identity(x):
    return x


class _WorkerDataset(IterableDataset):
    """torch IterableDataset: physical worker p plays logical worker ``(base + p) % W``."""

    def __init__(self, spec: WorkerSpec, states: dict, start_epoch: int, base: int,
                 schedule: ProgressSchedule, counters: dict):
        self.spec, self.states, self.start_epoch = spec, states, start_epoch
        self.base, self.schedule, self.counters = base, schedule, counters

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        p = info.id if info is not None else 0
        if info is not None:
            try:
                import cv2
                cv2.setNumThreads(1)
            except ImportError:
                pass
        W = self.spec.workers
        logical = (self.base + p) % W
        return worker_items(self.spec, logical, self.states.get(logical), self.start_epoch,
                            self.base + p, self.schedule, dict(self.counters.get(logical, {})))


class VideoLoader:
    """Iterable of :class:`ClipBatch` with ``state_dict``, ``load_state_dict``, ``set_progress``, ``stats``."""

    def __init__(self, spec: WorkerSpec, num_workers: int):
        import torch

        self.spec, self.num_workers = spec, int(num_workers)
        self.lookahead = max(self.num_workers, 1) * PREFETCH + 1 if self.num_workers > 0 else 0
        self.schedule = ProgressSchedule(4 * self.lookahead + 64)
        self._states: dict[int, Optional[dict]] = {}
        self._counters: dict[int, dict] = {}
        self._start_epoch = 0
        self._next_item = 0
        self._done: set = set()
        self._it = None
        self._loader = None
        self._dali = None
        self._main = {"dali_fallback": 0, "duplicated": 0}
        self._wait = 0.0
        self._batches = 0
        self._t_created = time.perf_counter()
        self._t_last = None
        self._busy = 0.0
        self._torch = torch

    # ------------------------------------------------------------------ trainer API
    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; applies from the batches not yet started."""
        self.schedule.set(self._next_item + self.lookahead, min(max(float(progress), 0.0), 1.0))

    def stats(self) -> dict:
        """Numeric counters, the same keys on every rank (safe to all-reduce):
        ``skipped`` (= bad_json + bad_video + bad_motion + missing_motion + missing_video +
        bad_other, the last being any other exception while preparing a sample),
        ``read_error`` (shards that ended early), ``lost_on_restore``, ``dropped_last`` (finite
        mode), ``dali_fallback``, ``duplicated``, ``batches``, ``data_wait_s``,
        ``data_wait_fraction`` (time in ``next()`` / wall time since the first call),
        ``bytes_read`` (bytes the workers read from the tars, cumulative over resumes) and
        ``clips`` (clips handed out by this loader object: batches * B * V)."""
        out = {k: 0 for k in COUNTERS}
        out.update(self._main)
        for c in self._counters.values():
            for k, v in c.items():
                if k in out and isinstance(v, (int, float)):
                    out[k] += v
        total = self._wait + self._busy
        out.update(batches=self._batches, clips=self._batches * self.spec.batch_size * self.spec.views, data_wait_s=self._wait,
                   data_wait_fraction=self._wait / total if total > 0 else 0.0)
        return out

    def last_error(self) -> str:
        """The most recent skip/read-error message of any worker ('' if none)."""
        msgs = [c.get("last_error", "") for c in self._counters.values()]
        return next((m for m in reversed(msgs) if m), "")

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.spec.rank, "world_size": self.spec.world_size,
                "workers": self.spec.workers, "seed": self.spec.seed, "next_item": self._next_item,
                "start_epoch": self._start_epoch, "streams": {str(k): v for k, v in self._states.items()},
                "counters": {str(k): v for k, v in self._counters.items()}, "done": sorted(self._done),
                "main": dict(self._main), "progress": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise MohicoError(f"loader state version {state.get('version')} is not {STATE_VERSION}: "
                              "this checkpoint's data-loader state comes from another release")
        self._shutdown()
        self.schedule.load_state_dict(state["progress"])
        self._main = dict(state["main"])
        same = (state["world_size"] == self.spec.world_size and state["workers"] == self.spec.workers
                and state["rank"] == self.spec.rank)
        counters = {int(k): v for k, v in state["counters"].items()}
        if same:
            self._states = {int(k): v for k, v in state["streams"].items()}
            self._counters = counters
            self._next_item, self._start_epoch = int(state["next_item"]), int(state["start_epoch"])
            self._done = set(state["done"])
        else:   # re-split: restart the oldest epoch with the new layout (documented above)
            epochs = [v["epoch"] for v in state["streams"].values() if v is not None]
            self._start_epoch = min(epochs) if epochs else int(state["start_epoch"])
            self._states, self._done = {}, set()
            merged: dict = {}
            for c in counters.values():
                for k, v in c.items():
                    merged[k] = merged.get(k, 0) + v if isinstance(v, (int, float)) else v
            self._counters = {0: merged}
            self._next_item = int(state["next_item"])

    def reshard(self, states: list[dict], step: int) -> None:
        """Resume at another world size (``states``: every old rank's :meth:`state_dict`): the
        old ranks' streams do not map to the new ranks, so this rank starts a fresh stream
        seeded from ``(seed, step)`` (not bitwise-continuous; samples of the epoch may repeat)."""
        self._shutdown()
        self.spec = dataclasses.replace(self.spec, seed=(self.spec.seed * 1_000_003 + int(step)) % 2 ** 31)
        self._states, self._counters, self._done = {}, {}, set()
        self._start_epoch = self._next_item = 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def _start(self) -> None:
        import torch

        base = self._next_item
        ds = _WorkerDataset(self.spec, dict(self._states), self._start_epoch, base,
                            self.schedule, dict(self._counters))
        if self.num_workers > 0:
            self._loader = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                prefetch_factor=PREFETCH, persistent_workers=False,
                # the workers' base seed from the loader's own generator: starting them never
                # moves the trainer's global RNG streams (they draw nothing from it either)
                generator=torch.Generator().manual_seed(self.spec.seed),
                # not fork: the main process runs DALI's threads, and a forked child can inherit
                # their locks held (observed: workers hung at start); a forkserver that ignores
                # the preemption signals, and workers that end with the rank
                **worker_process_options(os.getpid()))
            self._it = iter(self._loader)
        else:
            self._it = iter(ds)

    def _shutdown(self) -> None:
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            workers = list(getattr(it, "_workers", None) or [])
            it._shutdown_workers()
            for w in workers:          # its w.terminate() is SIGTERM, which the workers ignore
                if w.is_alive():
                    w.kill()
                    w.join(5)

    def __next__(self) -> ClipBatch:
        t0 = time.perf_counter()
        if self._t_last is not None:
            self._busy += t0 - self._t_last
        if self._it is None:
            self._start()
        while True:
            item = next(self._it)
            self._next_item += 1
            logical = item["logical"]
            self._states[logical] = item["state"]
            self._counters[logical] = item["counters"]
            if item.get("fatal") or (item.get("done") and self.spec.resampled):
                self._shutdown()
                raise MohicoError(no_usable_data_message(self.spec, logical, item.get("fatal") or (
                    "a whole epoch gave this stream no sample"), item["counters"], self.stats()))
            if item.get("done"):
                self._done.add(logical)
                if len(self._done) >= self.spec.workers:     # finite epoch over
                    self._shutdown()
                    self._start_epoch = max(s["epoch"] for s in self._states.values()) + 1
                    self._states, self._done = {}, set()
                    self._t_last = time.perf_counter()
                    raise StopIteration
                continue
            batch = self._assemble(item["samples"])
            break
        self._batches += 1
        self._t_last = time.perf_counter()
        self._wait += self._t_last - t0
        return batch

    def close(self) -> None:
        self._shutdown()

    def dead_workers(self) -> str:
        """'' while every loader worker lives, else which died and how (safe from another thread)."""
        it = self._it
        dead = [w for w in (getattr(it, "_workers", None) or []) if not w.is_alive() and w.exitcode not in (0, None)]
        if not dead:
            return ""
        how = ", ".join(f"pid {w.pid} " + (f"killed by signal {-w.exitcode}" if w.exitcode < 0 else f"exit {w.exitcode}")
                        for w in dead)
        return (f"rank {self.spec.rank}: data-loader worker(s) died ({how}; signal 9 is usually the OOM killer: "
                f"lower data.num_workers or data.batch_size)")

    def __del__(self):
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ decode + collate
    def _decoder(self):
        if self._dali is None:
            from mohico.datasets.load.dali_decode import DaliClipDecoder
            d = self.spec.data
            self._dali = DaliClipDecoder(self.spec.batch_size * self.spec.views, d.crop_size, d.mean, d.std,
                                         device=self.spec.device, num_threads=max(1, d.num_workers))
        return self._dali

    def _assemble(self, samples: list[dict]) -> ClipBatch:
        torch = self._torch
        B = len(samples)
        todo = [(b, v, c) for b, s in enumerate(samples) for v, c in enumerate(s["clips"]) if "data" in c]
        decoded = {}
        if todo:
            try:
                out = self._decoder().decode([c for _, _, c in todo])
                decoded = {(b, v): out[i] for i, (b, v, _) in enumerate(todo)}
            except Exception:  # noqa: BLE001 - DALI raises RuntimeError/IndexError on bad bytes
                self._dali = None                      # the pipeline object is invalid now
                decoded = self._fallback(todo)
        bad = {b for (b, v), x in decoded.items() if x is None}
        good = [b for b in range(B) if b not in bad]
        if not good:
            raise MohicoError("a whole batch failed to decode: the shards are unreadable")
        order = [b if b in good else good[(b - 1) % len(good)] for b in range(B)]
        self._main["duplicated"] += len(bad)
        dev = "cuda" if self.spec.device == "gpu" else "cpu"      # PyAV-path clips join DALI's
        clips = []
        for b in order:
            row = []
            for v, c in enumerate(samples[b]["clips"]):
                row.append(decoded[(b, v)] if (b, v) in decoded else torch.from_numpy(c["tensor"]))
            clips.append(torch.stack([r.to(dev) for r in row]))
        pick = [samples[b] for b in order]
        if any(len(s["clips"]) != self.spec.views for s in pick):
            raise MohicoError(f"the sampler drew {sorted({len(s['clips']) for s in pick})} clips per video, the "
                              f"objectives read {self.spec.views} (cfg.objectives.num_views): a sampler/objective "
                              f"mismatch in mohico.datasets.load.sampling")
        return ClipBatch(
            clips=torch.stack(clips),
            motion=torch.from_numpy(np.stack([s["motion"] for s in pick])),
            video_id=torch.tensor([s["video_id"] for s in pick], dtype=torch.int64),
            key=[s["key"] for s in pick],
            boxes=torch.from_numpy(np.stack([s["boxes"] for s in pick])),
            frames=torch.from_numpy(np.stack([s["frames"] for s in pick]).astype(np.int64)),
            flip=torch.from_numpy(np.stack([s["flip"] for s in pick])),
            crop_motion=torch.from_numpy(np.stack([s["crop_motion"] for s in pick])),
            progress=torch.tensor([s["progress"] for s in pick], dtype=torch.float32),
        )

    def _fallback(self, todo) -> dict:
        """Decode clips one by one with PyAV after a DALI failure (None: undecodable)."""
        from mohico.datasets.load.pipeline_cpu import transform_clip
        from mohico.datasets.load.remux import decode_frames

        d, out = self.spec.data, {}
        for b, v, c in todo:
            try:
                frames = decode_frames(c["data"], c["frames"])
                out[(b, v)] = self._torch.from_numpy(transform_clip(frames, c["box"], c["aug"],
                                                                    d.crop_size, d.mean, d.std))
                self._main["dali_fallback"] += 1
            except Exception:  # noqa: BLE001
                out[(b, v)] = None
        return out


def _device(cfg) -> str:
    if cfg.data.device != "auto":
        return cfg.data.device
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def build_loader(cfg, shards: Union[str, Sequence[str], None] = None, rank: int = 0,
                 world_size: int = 1) -> VideoLoader:
    """The loader for ``rank`` of ``world_size``; ``shards`` defaults to ``cfg.data.shards``.

    Raises ConfigError when the shards' short side is too small for ``data.crop_size``
    (:mod:`mohico.datasets.load.shard_geometry`) or hold fewer samples than loader streams
    (:func:`mohico.datasets.load.loader_checks.loader_start_problems`)."""
    urls = expand_shards(shards if shards else cfg.data.shards, allow_commands=cfg.data.allow_commands)
    problems = loader_start_problems(cfg, urls, world_size)    # crops must not upsample; a sample per stream
    if problems:
        raise ConfigError(problems[0])
    mcl, hico = "mcl" in cfg.objectives.enabled, "hico" in cfg.objectives.enabled
    if not (mcl or hico):
        mcl = True        # config validation forbids this; keep the loader usable standalone
    spec = WorkerSpec(urls=urls, seed=cfg.trainer.seed, rank=int(rank), world_size=int(world_size),
                      workers=max(1, cfg.data.num_workers), batch_size=cfg.data.batch_size,
                      shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                      data=cfg.data, sampling=cfg.sampling, mcl=mcl, hico=hico, views=cfg.objectives.num_views,
                      device=_device(cfg), decoder=cfg.data.decoder)
    advice = shuffle_buffer_advice(cfg.data)
    if advice:
        logging.getLogger("mohico.data").warning("%s", advice)
    return VideoLoader(spec, cfg.data.num_workers)
