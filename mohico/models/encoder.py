"""The pretrained encoder one import away: a ready backbone plus the preprocessing it was trained with.

    import mohico
    encoder, prep = mohico.load_encoder("runs/mcl")          # or an exported backbone file, ...
    x = prep(frames)                                          # frames: uint8 (T, H, W, 3) RGB
    emb = encoder(x)                                          # (1, D)

``load_encoder(path)`` reads anything ``mohico export`` reads (a backbone file, a run directory,
its ``checkpoints/`` folder, one DeepSpeed checkpoint folder, DeepSpeed zero_to_fp32's output)
and returns the backbone in eval mode with its weights loaded strictly, and a
:class:`Preprocessing`: ``mean``/``std`` (RGB, of pixels scaled to [0, 1]), ``clip_len`` (T
frames per clip), ``frame_stride`` (every n-th frame of the video), ``fps`` (the frame rate
``frame_stride`` counts at: the config's ``data.reference_fps``, else that of the shards the clips
came from; ``None`` when unknown), ``sampling_rate`` (= fps / frame_stride,
clip frames per second) and ``crop_size`` (H = W). The backbone also carries it as
``encoder.preprocessing``. Backbone files written by ``mohico export --format mohico`` record it;
a torchvision export writes it beside the weights as ``OUT.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mohico.checkpoint_read import META, read_meta, resolve_checkpoint
from mohico.config import load_config, to_dict
from mohico.datasets.shard_list import expand_shards
from mohico.errors import MohicoError
from mohico.models.backbone_file import BACKBONE_FORMAT, find_run_config, load_backbone, torch_load_cpu


@dataclass(frozen=True)
class Preprocessing:
    """How the encoder's training clips were made; ``__call__`` makes one from raw frames."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    clip_len: int
    frame_stride: int
    crop_size: int
    fps: Optional[float] = None

    @property
    def sampling_rate(self) -> Optional[float]:
        """Clip frames per second of video (``fps / frame_stride``), ``None`` if fps is unknown."""
        return None if self.fps is None else self.fps / self.frame_stride

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                   clip_len=int(d["clip_len"]), frame_stride=int(d["frame_stride"]),
                   crop_size=int(d["crop_size"]), fps=None if d.get("fps") is None else float(d["fps"]))

    def __call__(self, frames) -> torch.Tensor:
        """``frames``: uint8 ``(N, H, W, 3)`` RGB video frames at ``fps`` -> float ``(1, 3, T, S, S)``:
        ``clip_len`` frames every ``frame_stride`` from the middle of the video, the short side
        resized to ``crop_size`` (bilinear), a centre crop, then ``(x / 255 - mean) / std``."""
        x = torch.as_tensor(frames)
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be (N, H, W, 3) RGB; got shape {tuple(x.shape)}")
        need = (self.clip_len - 1) * self.frame_stride + 1
        start = max(0, (x.shape[0] - need) // 2)
        idx = torch.arange(self.clip_len) * self.frame_stride + start
        x = x[idx.clamp(max=x.shape[0] - 1)].permute(0, 3, 1, 2).float() / 255.0        # (T, 3, H, W)
        h, w = x.shape[-2:]
        scale = self.crop_size / min(h, w)
        size = (max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - self.crop_size) // 2, (size[1] - self.crop_size) // 2
        x = x[:, :, top:top + self.crop_size, left:left + self.crop_size]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def shards_fps(shards) -> Optional[float]:
    """The frame rate ``mohico shards`` wrote ``shards`` at (their manifest's ``options.fps``), or None."""
    if not shards:
        return None
    try:
        first = Path(expand_shards(shards)[0])
        return float(json.loads((first.parent / "manifest.json").read_text())["options"]["fps"])
    except Exception:  # noqa: BLE001 - the shards are not here (or not ours): fps unknown
        return None


def preprocessing_from_config(config: dict) -> Preprocessing:
    """The :class:`Preprocessing` of a training config given as a :func:`mohico.config.to_dict` dict."""
    data = config.get("data") or {}
    try:
        # frame_stride counts frames at data.reference_fps when set (training clips span the same
        # seconds on shards of any fps), else at the shards' own frame rate
        ref = float(data.get("reference_fps") or 0.0)
        return Preprocessing(mean=tuple(data["mean"]), std=tuple(data["std"]), clip_len=int(data["clip_len"]),
                             frame_stride=int(data["frame_stride"]), crop_size=int(data["crop_size"]),
                             fps=ref if ref > 0 else shards_fps(data.get("shards")))
    except (KeyError, TypeError, ValueError) as e:
        raise MohicoError(f"the run's config has no usable data.* preprocessing settings ({e})") from None


def _config_dict(path: Path) -> dict:
    if path.name == "mohico_meta.json":
        return json.loads(path.read_text()).get("config") or {}

    return to_dict(load_config(path))


def find_preprocessing(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Preprocessing:
    """The preprocessing recorded with a checkpoint in any form ``mohico export`` reads:
    a backbone file's ``preprocessing`` entry, else ``config`` (a config.yaml or mohico_meta.json),
    else the checkpoint's saved config, else a ``config.yaml``/``mohico_meta.json`` beside it."""
    path = Path(path)
    if config is not None:
        return preprocessing_from_config(_config_dict(Path(config)))
    if path.is_file() and path.suffix not in (".safetensors", ".bin"):
        obj = torch_load_cpu(path)
        if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
            if isinstance(obj.get("preprocessing"), dict):
                return Preprocessing.from_dict(obj["preprocessing"])
            raise MohicoError(f"{path}: this backbone file records no preprocessing (written by an older "
                              "mohico); pass config=RUN_DIR/config.yaml, or re-export it with "
                              "`mohico export RUN_DIR OUT.pt --format mohico`")
    if path.is_dir():
        try:
            ckdir, tag = resolve_checkpoint(path)
            if (ckdir / tag / META).is_file():
                return preprocessing_from_config(read_meta(ckdir, tag).get("config") or {})
        except MohicoError:
            pass                                   # e.g. a zero_to_fp32 output folder
    found = find_run_config(path)
    if found is None:
        raise MohicoError(f"{path}: no preprocessing recorded with it and no config.yaml or mohico_meta.json "
                          "beside it; pass config=RUN_DIR/config.yaml")
    return preprocessing_from_config(_config_dict(found))


def load_encoder(path: str | os.PathLike, config: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, Preprocessing]:
    """``(backbone, preprocessing)`` from any checkpoint ``mohico export`` reads (module docstring).

    The backbone is in eval mode on ``device``; ``backbone(x)`` maps ``x: (B, 3, T, H, W)`` to
    ``(B, D)`` embeddings, and ``backbone.preprocessing`` is the returned :class:`Preprocessing`.
    """
    _, _, backbone = load_backbone(path, config)
    prep = find_preprocessing(path, config)
    backbone.preprocessing = prep
    return backbone.to(device).eval(), prep
