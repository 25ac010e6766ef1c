"""Backbone files and export to torchvision's video models.

- ``save_backbone(path, name, options, backbone)`` writes a plain backbone file (atomic):
  ``{"format": "mohico.backbone", "version": 1, "name", "options", "state_dict"}``.
- ``load_checkpoint_state(path) -> (name, options, state_dict)`` reads one (``torch.load`` with
  ``weights_only=True``); the one place to teach other checkpoint kinds (run directories,
  DeepSpeed checkpoints).
- ``load_backbone(path)`` builds the backbone and loads its weights strictly.
- ``to_torchvision(backbone) -> state_dict`` that ``torchvision.models.video.<name>()`` (for
  ``r3d_18``, ``r2plus1d_18``, ``s3d``) loads with ``strict=True``.
- ``export_checkpoint(ckpt, out, fmt)`` is ``mohico export``.

The classifier: self-supervised pretraining trains no classifier, and ``strict=True`` needs
its keys, so the export sets torchvision's ``fc`` (``classifier.1`` for S3D) to **zeros**:
an untrained head that says so (every logit 0) instead of random weights that look trained,
and an export that is byte-for-byte reproducible. Replace it for your task as usual
(``model.fc = nn.Linear(512, num_classes)``) or train it from zero (a linear probe).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mohico.errors import MohicoError, UsageError
from mohico.utils import atomic_write_bytes

BACKBONE_FORMAT = "mohico.backbone"
BACKBONE_FORMAT_VERSION = 1
TORCHVISION_HEADS = {"r3d_18": "fc", "r2plus1d_18": "fc", "s3d": "classifier.1"}


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def _save(path: str | os.PathLike, obj: Any) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_backbone(path: str | os.PathLike, name: str, options: dict, backbone: nn.Module) -> Path:
    """Write ``backbone``'s weights with the ``name`` and ``options`` that rebuild it (atomic)."""
    return _save(path, {"format": BACKBONE_FORMAT, "version": BACKBONE_FORMAT_VERSION, "name": name,
                        "options": dict(options), "state_dict": _cpu_state(backbone)})


def load_checkpoint_state(path: str | os.PathLike) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(backbone_name, options, backbone_state_dict)`` from a checkpoint file.

    Reads the plain backbone files ``save_backbone`` writes. Raises ``UsageError`` for a missing
    path and ``MohicoError`` for anything unreadable or of another kind.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint file")
    if path.is_dir():   # a run directory, its checkpoints/ folder or one DeepSpeed checkpoint folder
        from mohico.trainer.checkpoint import load_backbone_state

        return load_backbone_state(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MohicoError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first[:300]}); "
                          "is it a complete file written by mohico?") from e
    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        if obj.get("version") != BACKBONE_FORMAT_VERSION:
            raise MohicoError(f"{path}: backbone file version {obj.get('version')!r}; this mohico reads "
                              f"version {BACKBONE_FORMAT_VERSION}")
        name, options, state = obj.get("name"), obj.get("options"), obj.get("state_dict")
        if not isinstance(name, str) or not isinstance(options, dict) or not isinstance(state, dict):
            raise MohicoError(f"{path}: damaged backbone file (needs 'name': str, 'options': dict, "
                              "'state_dict': dict)")
        return name, options, state
    kind = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
    raise MohicoError(f"{path}: not a mohico backbone checkpoint (found {kind}); "
                      "give a file written by mohico.models.export.save_backbone")


def load_backbone(path: str | os.PathLike) -> tuple[str, dict, nn.Module]:
    """Build the backbone a checkpoint names and load its weights with ``strict=True``."""
    from mohico.errors import ConfigError
    from mohico.models.backbones import build_backbone

    name, options, state = load_checkpoint_state(path)
    try:
        backbone = build_backbone(name, **options)
    except ConfigError as e:
        raise MohicoError(f"{path}: the checkpoint's backbone cannot be built: {e}") from e
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MohicoError(f"{path}: weights do not fit backbone {name!r} with options {options}: "
                          f"{str(e).splitlines()[0]}") from e
    return name, options, backbone


def to_torchvision(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of ``torchvision.models.video.<backbone.torchvision_name>()`` holding ``backbone``'s weights.

    Loads with ``strict=True``; the classifier is zeros (see the module docstring). Only the
    standard width (64) has a torchvision counterpart.
    """
    import torchvision.models.video as tvv

    tv_name = getattr(backbone, "torchvision_name", None)
    if tv_name not in TORCHVISION_HEADS:
        raise MohicoError(f"{type(backbone).__name__} has no torchvision video model counterpart "
                          f"(torchvision has {', '.join(TORCHVISION_HEADS)}); export with --format mohico")
    width = getattr(backbone, "width", None)
    if width != 64:
        raise MohicoError(f"{tv_name} with width={width} cannot be exported to torchvision, whose model has "
                          "the standard width 64; export with --format mohico")
    with torch.device("meta"):  # names and shapes only: no allocation, no initialisation
        reference = getattr(tvv, tv_name)(weights=None).state_dict()
    state = _cpu_state(backbone)
    head = TORCHVISION_HEADS[tv_name]
    missing = set(reference) - set(state) - {f"{head}.weight", f"{head}.bias"}
    extra = set(state) - set(reference)
    wrong = [k for k in state if k in reference and state[k].shape != reference[k].shape]
    if missing or extra or wrong:
        raise MohicoError(f"{tv_name}: layout differs from torchvision's (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(extra)[:5]}, wrong shape {wrong[:5]}); torchvision version?")
    return {k: state[k] if k in state else torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.items()}


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, fmt: str = "torchvision") -> Path:
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
    name, options, backbone = load_backbone(ckpt)
    if fmt == "mohico":
        return save_backbone(out, name, options, backbone)
    try:
        state = to_torchvision(backbone)
    except MohicoError as e:
        raise MohicoError(f"{ckpt}: {e}") from e
    return _save(out, state)
