"""``mohico export``: a checkpoint's backbone as a torchvision video model's state_dict, or a backbone file.

- ``to_torchvision(backbone) -> state_dict`` that ``torchvision.models.video.<name>()`` (for
  ``r3d_18``, ``r2plus1d_18``, ``s3d``) loads with ``strict=True``.
- ``export_checkpoint(ckpt, out, fmt)`` is ``mohico export``: it reads any checkpoint form
  :func:`mohico.models.backbone_file.load_checkpoint_state` reads, and writes the weights with the
  preprocessing the training clips had (:func:`mohico.models.encoder.find_preprocessing`).

The classifier: self-supervised pretraining trains no classifier, and ``strict=True`` needs
its keys, so the export sets torchvision's ``fc`` (``classifier.1`` for S3D) to **zeros**:
an untrained head that says so (every logit 0) instead of random weights that look trained,
and an export that is byte-for-byte reproducible. Replace it for your task as usual
(``model.fc = nn.Linear(512, num_classes)``) or train it from zero (a linear probe).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mohico.errors import MohicoError, UsageError
from mohico.models.backbone_file import cpu_state, load_backbone, save_backbone, save_torch
from mohico.models.encoder import find_preprocessing
from mohico.utils import atomic_write_text

TORCHVISION_HEADS = {"r3d_18": "fc", "r2plus1d_18": "fc", "s3d": "classifier.1"}


def to_torchvision(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of ``torchvision.models.video.<backbone.torchvision_name>()`` holding ``backbone``'s weights.

    Loads with ``strict=True``; the classifier is zeros (see the module docstring). Only the
    standard width (64) has a torchvision counterpart.
    """
    import torchvision.models.video as tvv

    tv_name = getattr(backbone, "torchvision_name", None)
    if tv_name not in TORCHVISION_HEADS:
        raise UsageError(f"{type(backbone).__name__} has no torchvision video model counterpart "
                          f"(torchvision has {', '.join(TORCHVISION_HEADS)}); export with --format mohico")
    width = getattr(backbone, "width", None)
    if width != 64:
        raise UsageError(f"{tv_name} with width={width} cannot be exported to torchvision, whose model has "
                          "the standard width 64; export with --format mohico")
    if getattr(backbone, "gating", False):
        raise UsageError(f"{tv_name} with gating=true (S3D-G) has self-gating layers torchvision's S3D lacks; "
                          "export with --format mohico")
    if getattr(backbone, "input", "rgb") != "rgb":
        raise UsageError(f"{tv_name} with input={backbone.input!r} is fed residual frames, torchvision's model "
                          "takes RGB clips; export with --format mohico")
    with torch.device("meta"):  # names and shapes only: no allocation, no initialisation
        reference = getattr(tvv, tv_name)(weights=None).state_dict()
    state = cpu_state(backbone)
    head = TORCHVISION_HEADS[tv_name]
    missing = set(reference) - set(state) - {f"{head}.weight", f"{head}.bias"}
    extra = set(state) - set(reference)
    wrong = [k for k in state if k in reference and state[k].shape != reference[k].shape]
    if missing or extra or wrong:
        raise MohicoError(f"{tv_name}: layout differs from torchvision's (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(extra)[:5]}, wrong shape {wrong[:5]}); torchvision version?")
    return {k: state[k] if k in state else torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.items()}


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, fmt: str = "torchvision",
                      config: str | os.PathLike | None = None) -> Path:
    """``mohico export``: write ``ckpt``'s backbone to ``out`` (atomic).

    ``fmt="torchvision"``: a plain state_dict for torchvision's model of the same name;
    ``fmt="mohico"``: a backbone file (``save_backbone``) that ``build_backbone`` + this module read.
    """
    if fmt not in ("torchvision", "mohico"):
        raise UsageError(f"--format must be 'torchvision' or 'mohico', got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give the output file, e.g. {out / 'backbone.pt'}")
    if Path(ckpt).exists() and out.exists() and out.resolve() == Path(ckpt).resolve():
        raise UsageError(f"{out}: the output would overwrite the checkpoint; choose another path")
    name, options, backbone = load_backbone(ckpt, config)
    try:
        prep = find_preprocessing(ckpt, config).to_dict()
    except MohicoError:   # e.g. an older backbone file: the weights still export
        prep = None
    if fmt == "mohico":
        return save_backbone(out, name, options, backbone, prep)
    try:
        state = to_torchvision(backbone)
    except MohicoError as e:      # a usage error (exit 2) stays one: the fix is --format mohico
        raise type(e)(f"{ckpt}: {e}") from e
    path = save_torch(out, state)
    if prep is not None:   # a plain state_dict has no room for it: OUT.json beside the weights
        atomic_write_text(Path(f"{out}.json"), json.dumps(
            {"format": "mohico.torchvision_export", "backbone": name, "preprocessing": prep}, indent=2) + "\n")
    return path
