"""DALI graph: decode remuxed clips, crop, resize, augment, normalise.

One DALI sample is one clip: the bytes of a small container holding the GOPs the clip needs
(:mod:`mohico.datasets.load.remux`), its int32 frame indices relative to that container's first
frame, its crop box and its augmentation draw. All randomness is drawn by the sampler (numpy,
deterministic per sample) and fed as per-sample arguments, so the graph is stateless and a
resumed run decodes exactly what an uninterrupted one would.

    bytes -> fn.decoders.video(frames=...)        device "cpu" (VP8/VP9/MJPEG) or "mixed" (GPU)
          -> fn.slice(box)  -> fn.resize(S, S)  -> fn.color_twist  -> fn.gaussian_blur
          -> fn.crop_mirror_normalize(mirror=flip, layout CFHW)   => (3, T, S, S) float32

The source is ``fn.external_source`` fed in batch mode from the main process: the parallel
work before it (shard reading, sampling, remuxing) runs in the torch DataLoader workers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

#: sigma used for "no blur": its 3-tap window is the identity to float precision
_NO_BLUR = 1e-3


class DaliClipDecoder:
    """Decodes lists of clips; ``device`` is ``"cpu"`` or ``"gpu"`` (the decoder runs "mixed")."""

    def __init__(self, max_clips: int, crop_size: int, mean: Sequence[float], std: Sequence[float],
                 device: str = "cpu", num_threads: int = 2, device_id: Optional[int] = None):
        from nvidia.dali import fn, pipeline_def, types

        self.max_clips, self.device = int(max_clips), device
        gpu = device == "gpu"
        if gpu and device_id is None:
            device_id = 0
        names = ("data", "frames", "anchor", "shape", "bright", "contrast", "sat", "hue", "sigma", "flip")
        self._names = names

        @pipeline_def(batch_size=self.max_clips, num_threads=num_threads,
                      device_id=device_id if gpu else None, prefetch_queue_depth=1,
                      exec_pipelined=False, exec_async=False)
        def graph():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
            shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
            arg = {n: fn.external_source(name=n, dtype=types.FLOAT, ndim=0)
                   for n in ("bright", "contrast", "sat", "hue", "sigma")}
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            video = fn.decoders.video(data, device="mixed" if gpu else "cpu", frames=frames)
            video = fn.slice(video, anchor, shape, axis_names="HW", normalized_anchor=False,
                             normalized_shape=False)
            video = fn.resize(video, resize_x=crop_size, resize_y=crop_size)
            video = fn.color_twist(video, brightness=arg["bright"], contrast=arg["contrast"],
                                   saturation=arg["sat"], hue=arg["hue"])
            video = fn.gaussian_blur(video, sigma=arg["sigma"])
            return fn.crop_mirror_normalize(
                video, mirror=flip, dtype=types.FLOAT, output_layout="CFHW",
                mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])

        self._pipe = graph()
        self._pipe.build()

    def decode(self, clips: list[dict]):
        """clips: dicts with ``data`` (bytes), ``frames`` (T,) relative indices, ``box``
        (x, y, w, h) whole pixels, ``aug`` (see sampling.draw_augment). Returns a torch tensor
        ``(N, 3, T, S, S)`` float32, on the GPU when decoding there (copied out of DALI's
        buffers with ``feed_ndarray``)."""
        out = [self._run(clips[i:i + self.max_clips]) for i in range(0, len(clips), self.max_clips)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _run(self, clips: list[dict]):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        p = self._pipe
        p.feed_input("data", [np.frombuffer(c["data"], np.uint8) for c in clips])
        p.feed_input("frames", [np.asarray(c["frames"], np.int32) for c in clips])
        p.feed_input("anchor", [np.array([c["box"][1], c["box"][0]], np.int32) for c in clips])
        p.feed_input("shape", [np.array([c["box"][3], c["box"][2]], np.int32) for c in clips])
        f32 = lambda v: np.array(v, np.float32)   # noqa: E731
        p.feed_input("bright", [f32(c["aug"]["brightness"]) for c in clips])
        p.feed_input("contrast", [f32(c["aug"]["contrast"]) for c in clips])
        p.feed_input("sat", [f32(0.0 if c["aug"]["grayscale"] else c["aug"]["saturation"]) for c in clips])
        p.feed_input("hue", [f32(c["aug"]["hue"]) for c in clips])
        p.feed_input("sigma", [f32(c["aug"]["blur_sigma"] or _NO_BLUR) for c in clips])
        p.feed_input("flip", [np.array(int(c["aug"]["flip"]), np.int32) for c in clips])
        (out,) = p.run()
        dense = out.as_tensor()
        result = torch.empty(tuple(dense.shape()), dtype=torch.float32,
                             device="cuda" if self.device == "gpu" else "cpu")
        feed_ndarray(dense, result)
        return result
