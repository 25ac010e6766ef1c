"""The training sampler's draw for one shard sample, as overlays for :func:`render_sample`.

``mohico inspect --config C`` runs exactly what a loader worker runs for that sample
(:func:`mohico.datasets.load.pipeline_worker.prepare_sample`): the worker spec comes from
:func:`mohico.datasets.load.pipeline.build_loader` for the same config, rank and world size, the
generator from :func:`sample_rng` with ``(trainer.seed, epoch, rank, key)`` and the views from
:class:`ClipSampler` at the given training progress. So the clips, boxes (stored-frame pixels,
what the batch's ``boxes`` holds), crop method and flip drawn here are the ones a batch
containing this sample in that epoch on that rank gets, when the loader's progress is the same.

Data flows one way: this module imports the sampler and the pipeline, never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mohico.datasets.load.pipeline import build_loader
from mohico.datasets.load.sampling import ClipSampler, SampleDraw, sample_rng
from mohico.datasets.sample_schema import typed_meta

COLORS = [(255, 80, 80), (80, 200, 255), (120, 255, 120)]


@dataclass
class InspectDraw:
    """One sample's draw plus what produced it."""
    key: str
    draw: SampleDraw
    names: list            # per view: "query"/"key" (MCL only) or "v_i"/"v_j"/"v_k" (HiCo on)
    progress: float
    seed: int
    epoch: int
    rank: int
    mcl: bool
    hico: bool


def view_names(mcl: bool, hico: bool) -> list[str]:
    if hico:
        return ["v_i=query", "v_j=key", "v_k"] if mcl else ["v_i", "v_j", "v_k"]
    return ["query", "key"]


def worker_spec(cfg, shard, rank: int = 0, world_size: int = 1):
    """The :class:`WorkerSpec` the training loader builds for ``cfg`` (no worker is started)."""
    loader = build_loader(cfg, [str(shard)], rank=rank, world_size=world_size)
    spec = loader.spec
    loader.close()
    return spec


def draw_sample(cfg, shard, sample: dict, progress: float = 0.0, epoch: int = 0, rank: int = 0,
                world_size: int = 1) -> InspectDraw:
    """The sampler's draw for ``sample`` (a :func:`read_sample` dict of ``shard``) as the pipeline
    makes it.

    The seed is ``cfg.trainer.seed``; ``progress`` is the loader's training progress in [0, 1].
    """
    spec = worker_spec(cfg, shard, rank, max(int(world_size), int(rank) + 1))
    meta = typed_meta(sample["meta"])                     # as prepare_sample normalises them
    progress = min(max(float(progress), 0.0), 1.0)
    sampler = ClipSampler(spec.sampling, spec.data, spec.mcl, spec.hico, spec.views)
    rng = sample_rng(spec.seed, epoch, spec.rank, sample["key"])
    draw = sampler.sample(meta, sample["motion"], rng, progress)
    return InspectDraw(key=sample["key"], draw=draw, names=view_names(spec.mcl, spec.hico),
                       progress=progress, seed=int(spec.seed), epoch=int(epoch), rank=int(spec.rank),
                       mcl=spec.mcl, hico=spec.hico)


def overlays_for(d: InspectDraw) -> list[dict]:
    """``render_sample`` overlays: per view its clip frames, pixel box, and a label naming the
    view, the crop (``motion`` crop or ``random`` fallback) and the flip."""
    out = []
    for v, name in enumerate(d.names):
        method = d.draw.crop_methods[v]
        flip = bool(d.draw.augment[v]["flip"])
        out.append({"frames": [int(f) for f in d.draw.frames[v]],
                    "box": tuple(int(b) for b in d.draw.boxes[v]),
                    "label": f"{name}: {method} crop{', flip' if flip else ''}",
                    "short": f"{name.split('=')[0]} {'M' if method == 'motion' else 'R'}{' flip' if flip else ''}",
                    "color": COLORS[v % len(COLORS)], "crop": method, "flip": flip})
    return out


def notes_for(d: InspectDraw, fps: float) -> list[str]:
    """Caption lines: what produced the draw and how its clips were chosen."""
    dr = d.draw
    objs = "+".join(n for n, on in (("MCL", d.mcl), ("HiCo", d.hico)) if on)
    centres = ", ".join(f"{(s + (dr.frames[v][-1] - dr.frames[v][0]) / 2) / fps:.2f}s"
                        for v, s in enumerate(np.asarray(dr.starts).tolist()))
    return [(f"sampler ({objs}): seed={d.seed} epoch={d.epoch} rank={d.rank} progress={d.progress:.3g} "
            f"{f'delta_max={dr.delta_max:.3g}s  ' if d.hico else ''}temporal draw: {'motion-focused' if dr.focused else 'uniform'}  "
            f"clip centres: {centres}  (M: motion crop, R: random fallback)")]
