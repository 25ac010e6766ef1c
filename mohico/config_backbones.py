"""The backbone names ``model.backbone`` accepts and the keyword options each takes
(``model.backbone_options``), with the check both the config and the model builder run.

Bottom floor (only ``mohico.errors``): :func:`mohico.config_validate.validate` checks a config against it
without importing the models, and :func:`mohico.models.backbones.build_backbone` runs the same
check before building. ``mohico.models.backbones.BACKBONES`` maps each name to its builder;
tests/test_models.py checks that the two list the same names and that each builder takes
exactly these options.
"""
from __future__ import annotations

import difflib
from typing import Iterable

from mohico.errors import ConfigError

_MSNET = ("width", "corr_channels", "radius", "sigma", "temperature", "impl", "reduction")

BACKBONE_OPTIONS: dict[str, tuple[str, ...]] = {
    "r3d_18": ("width", "input"),
    "r2plus1d_18": ("width", "input"),
    "s3d": ("width", "input", "gating", "bn_momentum"),
    "tsm_resnet18": ("width",),
    "tsm_resnet50": ("width",),
    "msnet_resnet18": _MSNET,
    "msnet_resnet50": _MSNET,
}


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_backbone(name: str, options: Iterable[str] = ()) -> None:
    """Raise ``ConfigError`` naming ``model.backbone`` (an unknown ``name``, with the registered
    ones) or ``model.backbone_options.KEY`` (an option ``name``'s builder does not take, with its
    options), each with the closest valid spelling."""
    if name not in BACKBONE_OPTIONS:
        raise ConfigError(f"'model.backbone': unknown backbone {name!r}{_hint(name, BACKBONE_OPTIONS)} "
                          f"(registered: {', '.join(sorted(BACKBONE_OPTIONS))})")
    valid = BACKBONE_OPTIONS[name]
    for key in options:
        if key not in valid:
            raise ConfigError(f"'model.backbone_options.{key}': backbone {name!r} has no option {key!r}"
                              f"{_hint(str(key), valid)} (valid: {', '.join(valid) or 'none'})")
