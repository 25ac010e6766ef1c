"""Backbone files and export to torchvision's video models.

- ``save_backbone(path, name, options, backbone)`` writes a plain backbone file (atomic):
  ``{"format": "mohico.backbone", "version": 1, "name", "options", "state_dict"}``.
- ``load_checkpoint_state(path, config=None) -> (name, options, state_dict)`` reads any form
  (``torch.load`` with ``weights_only=True``): a backbone file; a run directory, its
  ``checkpoints/`` folder or one DeepSpeed checkpoint folder; or the consolidated fp32 state dict
  DeepSpeed's ``zero_to_fp32`` writes (a ``pytorch_model.bin`` / ``*.safetensors`` file or its
  output folder, sharded or not), whose backbone is named by ``config`` or a ``config.yaml`` /
  ``mohico_meta.json`` found beside it or in a parent folder.
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


def save_backbone(path: str | os.PathLike, name: str, options: dict, backbone: nn.Module,
                  preprocessing: dict | None = None) -> Path:
    """Write ``backbone``'s weights with the ``name`` and ``options`` that rebuild it (atomic), and
    the ``preprocessing`` its training clips had (``mohico.models.encoder.Preprocessing.to_dict()``)."""
    obj = {"format": BACKBONE_FORMAT, "version": BACKBONE_FORMAT_VERSION, "name": name,
           "options": dict(options), "state_dict": _cpu_state(backbone)}
    if preprocessing is not None:
        obj["preprocessing"] = dict(preprocessing)
    return _save(path, obj)


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
        from mohico.trainer.checkpoint import load_backbone_state

        return load_backbone_state(path)
    obj = _read_consolidated(path) if path.suffix == ".safetensors" else _torch_load(path)
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


def _torch_load(path: Path) -> Any:
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
            import json

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
            part = _torch_load(f)
            if not isinstance(part, dict):
                raise MohicoError(f"{f}: expected a state dict, found {type(part).__name__}")
            state.update(part)
    return state


def _from_consolidated(path: Path, state: dict, config: str | os.PathLike | None):
    """The backbone of a whole-module state dict (``backbone.*`` keys), named by the run's config."""
    from mohico.config import load_config

    cfg_path = Path(config) if config is not None else _find_run_config(path)
    if cfg_path is None:
        raise UsageError(f"{path}: a consolidated state dict does not say which backbone it holds; pass "
                         "--config RUN_DIR/config.yaml (the resolved config the run saved)")
    if cfg_path.name == "mohico_meta.json":
        import json

        model = (json.loads(cfg_path.read_text()).get("config") or {}).get("model") or {}
        name, options = model.get("backbone"), dict(model.get("backbone_options") or {})
    else:
        cfg = load_config(cfg_path)
        name, options = cfg.model.backbone, dict(cfg.model.backbone_options)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not name or not backbone:
        raise MohicoError(f"{path}: no backbone weights ('backbone.*') or no model.backbone in {cfg_path}")
    return name, options, backbone


def _find_run_config(path: Path) -> Path | None:
    """``config.yaml`` or ``mohico_meta.json`` beside ``path`` or in up to three parent folders."""
    folder = path if path.is_dir() else path.parent
    for d in [folder, *list(folder.parents)[:3]]:
        for name in ("mohico_meta.json", "config.yaml"):
            if (d / name).is_file():
                return d / name
    return None


def load_backbone(path: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[str, dict, nn.Module]:
    """Build the backbone a checkpoint names and load its weights with ``strict=True``."""
    from mohico.errors import ConfigError
    from mohico.models.backbones import build_backbone

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
    from mohico.models.encoder import find_preprocessing

    name, options, backbone = load_backbone(ckpt, config)
    try:
        prep = find_preprocessing(ckpt, config).to_dict()
    except MohicoError:   # e.g. an older backbone file: the weights still export
        prep = None
    if fmt == "mohico":
        return save_backbone(out, name, options, backbone, prep)
    try:
        state = to_torchvision(backbone)
    except MohicoError as e:
        raise MohicoError(f"{ckpt}: {e}") from e
    path = _save(out, state)
    if prep is not None:   # a plain state_dict has no room for it: OUT.json beside the weights
        import json

        from mohico.utils import atomic_write_text

        atomic_write_text(Path(f"{out}.json"), json.dumps(
            {"format": "mohico.torchvision_export", "backbone": name, "preprocessing": prep}, indent=2) + "\n")
    return path
