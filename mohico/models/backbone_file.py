"""Backbone files, and the backbone of a checkpoint in any form.

- ``save_backbone(path, name, options, backbone)`` writes a plain backbone file (atomic):
  ``{"format": "mohico.backbone", "version": 1, "name", "options", "state_dict"}`` (+
  ``"preprocessing"``: ``mohico.models.encoder.Preprocessing.to_dict()``).
- ``load_checkpoint_state(path, config=None) -> (name, options, state_dict)`` reads any form
  (``torch.load`` with ``weights_only=True``): a backbone file; a run directory, its
  ``checkpoints/`` folder or one DeepSpeed checkpoint folder (:mod:`mohico.checkpoint_read`); or
  the consolidated fp32 state dict DeepSpeed's ``zero_to_fp32`` writes (a ``pytorch_model.bin`` /
  ``*.safetensors`` file or its output folder, sharded or not), whose backbone is named by
  ``config`` or a ``config.yaml`` / ``mohico_meta.json`` found beside it or in a parent folder
  (:func:`find_run_config`).
- ``load_backbone(path)`` builds the backbone and loads its weights strictly.

``mohico.models.encoder`` (the encoder plus its preprocessing) and ``mohico.models.export``
(``mohico export``) build on this module.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mohico.checkpoint_read import load_backbone_state
from mohico.config import load_config
from mohico.errors import ConfigError, MohicoError, UsageError
from mohico.models.backbones import build_backbone
from mohico.utils import atomic_write_bytes

BACKBONE_FORMAT = "mohico.backbone"
BACKBONE_FORMAT_VERSION = 1


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_backbone(path: str | os.PathLike, name: str, options: dict, backbone: nn.Module,
                  preprocessing: dict | None = None) -> Path:
    """Write ``backbone``'s weights with the ``name`` and ``options`` that rebuild it (atomic), and
    the ``preprocessing`` its training clips had (``mohico.models.encoder.Preprocessing.to_dict()``)."""
    obj = {"format": BACKBONE_FORMAT, "version": BACKBONE_FORMAT_VERSION, "name": name,
           "options": dict(options), "state_dict": cpu_state(backbone)}
    if preprocessing is not None:
        obj["preprocessing"] = dict(preprocessing)
    return save_torch(path, obj)


def load_checkpoint_state(path: str | os.PathLike,
                          config: str | os.PathLike | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """``(backbone_name, options, backbone_state_dict)`` from any checkpoint form (module docstring).

    Raises ``UsageError`` for a missing path or an unnamed consolidated state dict, and
    ``MohicoError`` for anything unreadable or of another kind.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint file")
    if path.is_dir():
        if _consolidated_files(path):                   # zero_to_fp32's output folder
            return _from_consolidated(path, _read_consolidated(path), config)
        # a run directory, its checkpoints/ folder or one DeepSpeed checkpoint folder
        return load_backbone_state(path)
    obj = _read_consolidated(path) if path.suffix == ".safetensors" else torch_load_cpu(path)
    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        if obj.get("version") != BACKBONE_FORMAT_VERSION:
            raise MohicoError(f"{path}: backbone file version {obj.get('version')!r}; this mohico reads "
                              f"version {BACKBONE_FORMAT_VERSION}")
        name, options, state = obj.get("name"), obj.get("options"), obj.get("state_dict")
        if not isinstance(name, str) or not isinstance(options, dict) or not isinstance(state, dict):
            raise MohicoError(f"{path}: damaged backbone file (needs 'name': str, 'options': dict, "
                              "'state_dict': dict)")
        return name, options, state
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith("backbone.") for k in obj):
        return _from_consolidated(path, obj, config)
    kind = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
    raise MohicoError(f"{path}: not a mohico checkpoint (found {kind}); give a backbone file, a run "
                      "directory, a DeepSpeed checkpoint folder or a zero_to_fp32 output")


def torch_load_cpu(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MohicoError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first[:300]}); "
                          "is it a complete file written by mohico or DeepSpeed?") from e


# --------------------------------------------------------------------------- zero_to_fp32 output
_CONSOLIDATED = ("pytorch_model.bin.index.json", "model.safetensors.index.json", "pytorch_model.bin",
                 "model.safetensors")


def _consolidated_files(folder: Path) -> list[Path]:
    """The weight files of a zero_to_fp32 output folder (index json first when sharded), else []."""
    for name in _CONSOLIDATED:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise MohicoError(f"{f}: not a valid shard index ({e})") from e
            return [folder / s for s in shards]
        return [f]
    return []


def _read_consolidated(path: Path) -> dict[str, torch.Tensor]:
    files = _consolidated_files(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise MohicoError(f"{f}: a shard listed in the index is missing")
        if f.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise MohicoError(f"{f}: reading .safetensors needs the 'safetensors' package "
                                  "(pip install safetensors)") from e
            state.update(load_file(str(f)))
        else:
            part = torch_load_cpu(f)
            if not isinstance(part, dict):
                raise MohicoError(f"{f}: expected a state dict, found {type(part).__name__}")
            state.update(part)
    return state


def _from_consolidated(path: Path, state: dict, config: str | os.PathLike | None):
    """The backbone of a whole-module state dict (``backbone.*`` keys), named by the run's config."""
    cfg_path = Path(config) if config is not None else find_run_config(path)
    if cfg_path is None:
        raise UsageError(f"{path}: a consolidated state dict does not say which backbone it holds; pass "
                         "--config RUN_DIR/config.yaml (the resolved config the run saved)")
    if cfg_path.name == "mohico_meta.json":
        model = (json.loads(cfg_path.read_text()).get("config") or {}).get("model") or {}
        name, options = model.get("backbone"), dict(model.get("backbone_options") or {})
    else:
        cfg = load_config(cfg_path)
        name, options = cfg.model.backbone, dict(cfg.model.backbone_options)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not name or not backbone:
        raise MohicoError(f"{path}: no backbone weights ('backbone.*') or no model.backbone in {cfg_path}")
    return name, options, backbone


def find_run_config(path: Path) -> Path | None:
    """``config.yaml`` or ``mohico_meta.json`` beside ``path`` or in up to three parent folders."""
    folder = path if path.is_dir() else path.parent
    for d in [folder, *list(folder.parents)[:3]]:
        for name in ("mohico_meta.json", "config.yaml"):
            if (d / name).is_file():
                return d / name
    return None


def load_backbone(path: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[str, dict, nn.Module]:
    """Build the backbone a checkpoint names and load its weights with ``strict=True``."""
    name, options, state = load_checkpoint_state(path, config)
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
