"""Weights to start from: 2D ImageNet ResNet-18 weights inflated into the 3D backbones (``model.init``).

    state2d = read_2d_state("resnet18.pt")        # torchvision state_dict or MoCo v2 checkpoint
    report = inflate_into(backbone, state2d)       # loads what fits; report.unused / .not_fitting / .left_random

Files (read with ``torch.load(weights_only=True)``: tensors and plain values, never code):

- a torchvision ResNet state_dict (``torch.save(torchvision.models.resnet18().state_dict(), F)``):
  keys ``conv1.weight``, ``bn1.*``, ``layerL.B.conv1.weight``, ... (``fc.*`` and the BN step
  counters ``num_batches_tracked`` are dropped);
- a MoCo v2 checkpoint ``{'state_dict': {'module.encoder_q.conv1.weight': ...}}``: the query
  encoder's keys, prefix stripped (``encoder_k``, ``queue`` and the ``fc`` MLP head are dropped).

A bottleneck ResNet (ResNet-50 and deeper, ``layerL.B.conv3``: the released MoCo v2 checkpoints) is
refused: only some of its tensors would fit a ResNet-18 by name and shape.

Inflation (I3D, Carreira & Zisserman 2017): a 2D kernel ``W: (O, I, kh, kw)`` becomes the 3D
kernel ``W3[:, :, t] = W / kt`` for each of the ``kt`` time taps, so on a clip of identical
frames the 3D conv gives the 2D conv's output at every frame away from the clip's ends (where
the zero temporal padding enters). Batch norms are copied as they are.

Targets (torchvision's layouts, :class:`mohico.models.backbones.VideoResNet`):

- ``r3d_18``: ``conv1`` -> ``stem.0`` (3x7x7), ``bn1`` -> ``stem.1``; in every block ``convN`` ->
  ``convN.0`` (3x3x3), ``bnN`` -> ``convN.1``, ``downsample.{0,1}`` -> ``downsample.{0,1}`` (1x1x1).
  The 2D net's max-pool after the stem has no counterpart (torchvision's R3D has none).
- ``r2plus1d_18``: a (2+1)D conv is ``spatial (1xkxk, I -> M) -> BN(M) -> ReLU -> temporal (3x1x1,
  M -> O)`` with ``M >= O`` mid channels (144 for 64 -> 64). The 2D kernel fills the spatial
  conv's first ``O`` mid channels; the temporal conv starts as the identity in time on them
  (centre tap ``[o, o, 1] = 1``, every other entry 0, so the ``M - O`` extra mid channels keep
  their random spatial weights but are muted until training opens their temporal weights); the
  mid BN stays fresh and the 2D ``bnN`` goes to ``convN.1``, the BN after the (2+1)D conv, where
  the 2D net has it. The ReLU between the two convs makes this exact only where the 2D conv's
  output is >= 0 (no (2+1)D factorisation with that ReLU reproduces a 2D conv exactly). The stem's
  spatial conv has 45 mid channels, fewer than ``conv1``'s 64: ``conv1`` / ``bn1`` do not fit and
  are reported; the stem keeps its random init.

Whatever does not fit (another shape, another width, a 6-channel ``rgb+residual`` stem) is reported
by name; a file of which nothing fits is a ``ConfigError`` naming ``model.init`` and the file.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mohico.errors import ConfigError

log = logging.getLogger("mohico.models")

INFLATABLE = ("r3d_18", "r2plus1d_18")
_MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")


def read_2d_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The 2D ResNet weights of ``path`` (torchvision state_dict or MoCo v2 checkpoint), classifier
    dropped, keys in torchvision's ResNet names. Raises ``ConfigError`` naming ``model.init``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"'model.init': {path} is not a file (a torchvision ResNet state_dict saved with "
                          f"torch.save, or a MoCo v2 checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors have many types
        raise ConfigError(f"'model.init': cannot read {path} with torch.load(weights_only=True) "
                          f"({type(e).__name__}: {str(e)[:200]}); it must hold tensors only: a state_dict or "
                          f"{{'state_dict': ...}}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"'model.init': {path} holds no state_dict (a dict of tensors)")
    keys = [str(k) for k in obj]
    moco = any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in keys)
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        key = str(key)
        if moco and "encoder_q." not in key:
            continue                                   # encoder_k, queue, queue_ptr
        for prefix in _MOCO_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith("fc.") or key.endswith(".num_batches_tracked") or not isinstance(value, torch.Tensor):
            continue
        out[key] = value
    if "conv1.weight" not in out:
        raise ConfigError(f"'model.init': {path} is not a ResNet state_dict (no 'conv1.weight' among its keys, "
                          f"e.g. {keys[:4]}); give torchvision.models.resnet18().state_dict() saved with "
                          f"torch.save, or a MoCo v2 checkpoint")
    bottleneck = sorted(k for k in out if re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", k))
    if bottleneck:
        raise ConfigError(f"'model.init': {path} holds a bottleneck ResNet (ResNet-50 or deeper: {bottleneck[0]!r}); "
                          f"model.init inflates ResNet-18 weights into r3d_18 / r2plus1d_18, and a ResNet-50's "
                          f"layers would only partly fit (the released MoCo v2 checkpoints are ResNet-50s): give a "
                          f"ResNet-18 state_dict or MoCo v2 ResNet-18 checkpoint, or model.init='' for a random init")
    return out


def inflate_kernel(w: torch.Tensor, t: int) -> torch.Tensor:
    """``(O, I, kh, kw) -> (O, I, t, kh, kw)``: the 2D kernel repeated over ``t`` time taps, divided by ``t``."""
    return w.unsqueeze(2).repeat(1, 1, t, 1, 1) / t


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)        # 3D keys written
    not_fitting: list[str] = field(default_factory=list)   # "2D key -> 3D key (shapes)" that did not fit
    unused: list[str] = field(default_factory=list)        # 2D keys with no place in the backbone
    left_random: list[str] = field(default_factory=list)   # 3D parameters no 2D key reached (kept as built)

    def lines(self) -> list[str]:
        out = [f"model.init: {len(self.loaded)} tensors loaded"]
        for what, keys in (("did not fit", self.not_fitting), ("unused 2D keys", self.unused),
                           ("kept their initialisation", self.left_random)):
            if keys:
                out.append(f"model.init: {what} ({len(keys)}): {', '.join(keys)}")
        return out


_BN = ("weight", "bias", "running_mean", "running_var")


def _pairs(name: str, state3d: dict) -> list[tuple[str, str, str]]:
    """``(2D key, 3D key, kind)`` for ``name``'s layout; kind: ``full`` (inflate over the 3D kernel's
    time taps), ``spatial`` (into a (2+1)D spatial conv), ``copy`` (BN)."""
    out = []
    r21 = name == "r2plus1d_18"
    stem_conv = "stem.0.weight"
    out.append(("conv1.weight", stem_conv, "spatial" if r21 else "full"))
    out += [(f"bn1.{p}", f"stem.1.{p}", "copy") for p in _BN]
    blocks = sorted({m.group(1) for k in state3d if (m := re.match(r"(layer\d+\.\d+)\.", k))})
    for block in blocks:
        for n in (1, 2):
            conv3d = f"{block}.conv{n}.0.0.weight" if r21 else f"{block}.conv{n}.0.weight"
            out.append((f"{block}.conv{n}.weight", conv3d, "spatial" if r21 else "full"))
            out += [(f"{block}.bn{n}.{p}", f"{block}.conv{n}.1.{p}", "copy") for p in _BN]
        if f"{block}.downsample.0.weight" in state3d:
            out.append((f"{block}.downsample.0.weight", f"{block}.downsample.0.weight", "full"))
            out += [(f"{block}.downsample.1.{p}", f"{block}.downsample.1.{p}", "copy") for p in _BN]
    return out


def inflate_into(backbone: nn.Module, state2d: dict[str, torch.Tensor], source: str = "model.init") -> InitReport:
    """Load ``state2d`` (2D ResNet names) into ``backbone`` (``r3d_18`` / ``r2plus1d_18``) in place,
    as the module docstring says; returns what was loaded and what was not. Raises ``ConfigError``
    when the backbone is of another kind or nothing fits."""
    name = getattr(backbone, "torchvision_name", None)
    if name not in INFLATABLE:
        raise ConfigError(f"'model.init': inflating 2D ResNet-18 weights needs model.backbone r3d_18 or "
                          f"r2plus1d_18; got {name or type(backbone).__name__}")
    state3d = backbone.state_dict()
    report = InitReport()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k2, k3, kind in _pairs(name, state3d):
        if k2 not in state2d or k3 not in state3d:
            continue
        used.add(k2)
        w2, target = state2d[k2], state3d[k3]
        value = None
        if kind == "copy":
            value = w2 if w2.shape == target.shape else None
        elif w2.ndim == 4 and target.ndim == 5 and target.shape[3:] == w2.shape[2:] and target.shape[1] == w2.shape[1]:
            if kind == "full" and target.shape[0] == w2.shape[0]:
                value = inflate_kernel(w2, target.shape[2])
            elif kind == "spatial" and target.shape[2] == 1 and target.shape[0] >= w2.shape[0]:
                value = _into_2plus1d(backbone, k3, w2, new)
        if value is None:
            report.not_fitting.append(f"{k2} {tuple(w2.shape)} -> {k3} {tuple(target.shape)}")
            continue
        new[k3] = value.to(target.dtype)
    report.unused = sorted(set(state2d) - used)
    if not new:
        raise ConfigError(f"'model.init': nothing of {source} fits backbone {name} (width "
                          f"{getattr(backbone, 'width', '?')}; the file must be a ResNet-18 of the standard width "
                          f"64); did not fit: {', '.join(report.not_fitting[:6])}")
    with torch.no_grad():
        for k3, value in new.items():
            state3d[k3].copy_(value)
    report.loaded = sorted(new)
    params = {k for k, _ in backbone.named_parameters()}
    report.left_random = sorted(params - set(new))
    return report


def _into_2plus1d(backbone: nn.Module, spatial_key: str, w2: torch.Tensor, new: dict) -> torch.Tensor | None:
    """The spatial kernel of a (2+1)D conv with ``w2`` in its first ``O`` mid channels (the rest keep
    their current values), and its temporal conv (``...0.3.weight``) set to the identity in time on
    those channels, written into ``new``. None when the temporal conv does not have ``O`` outputs."""
    state = backbone.state_dict()
    spatial = state[spatial_key].clone()
    temporal_key = spatial_key[: -len("0.weight")] + "3.weight"
    temporal = state.get(temporal_key)
    o = w2.shape[0]
    if temporal is None or temporal.shape[0] != o or temporal.shape[1] != spatial.shape[0] or temporal.shape[3:] != (1, 1):
        return None
    spatial[:o] = w2.unsqueeze(2)
    ident = torch.zeros_like(temporal)
    centre = temporal.shape[2] // 2
    ident[torch.arange(o), torch.arange(o), centre] = 1.0
    new[temporal_key] = ident
    return spatial


def load_init(backbone: nn.Module, path: str | os.PathLike) -> InitReport:
    """:func:`read_2d_state` + :func:`inflate_into`, logging what was loaded and, by name, what was not."""
    report = inflate_into(backbone, read_2d_state(path), source=str(path))
    for line in report.lines():
        log.info("%s", line)
    return report
