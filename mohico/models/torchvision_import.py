"""Reading a torchvision video-model state_dict back as a mohico backbone (the inverse of
:func:`mohico.models.export.to_torchvision`): ``mohico eval`` accepts what ``mohico export
--format torchvision`` writes, and torchvision's own ``r3d_18`` / ``r2plus1d_18`` / ``s3d`` weights.

``torchvision_backbone_state(path, name)`` -> the state_dict without torchvision's classifier
(``fc`` / ``classifier.1``), or None when ``path`` is not a plain state_dict of that model. The
backbone name is ``OUT.pt.json``'s ``backbone`` (written beside a torchvision export) when
present, else ``name`` (the config's ``model.backbone``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from mohico.models.export import TORCHVISION_HEADS


def torchvision_name(path: str | os.PathLike, default: str) -> str:
    """The backbone recorded in ``<path>.json`` beside a torchvision export, else ``default``."""
    side = Path(f"{path}.json")
    try:
        meta = json.loads(side.read_text())
        if meta.get("format") == "mohico.torchvision_export" and isinstance(meta.get("backbone"), str):
            return meta["backbone"]
    except (OSError, ValueError, AttributeError):
        pass
    return default


def torchvision_backbone_state(path: str | os.PathLike, name: str) -> Optional[dict[str, torch.Tensor]]:
    """The backbone weights of a torchvision ``name`` state_dict file (head dropped), else None."""
    path = Path(path)
    head = TORCHVISION_HEADS.get(name)
    if head is None or not path.is_file() or path.suffix == ".safetensors":
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours to judge: the generic loader reports it
        return None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if f"{head}.weight" not in obj or any(str(k).startswith("backbone.") for k in obj):
        return None
    return {k: v for k, v in obj.items() if not k.startswith(f"{head}.")}
