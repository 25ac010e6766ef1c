"""Pretraining objectives, one file per method, and their registry.

``OBJECTIVES[name](cfg, backbone)`` builds the objective ``cfg.objectives.<name>`` around the
shared backbone (which the objective uses but does not own); each implements the
:class:`~mohico.models.objectives.base.Objective` protocol. ``PretrainModule`` builds the ones
``cfg.objectives.enabled`` names (``objectives.<name>.weight > 0``).
"""
from typing import Callable

from torch import nn

from mohico.config import Config
from mohico.models.objectives.base import Objective
from mohico.models.objectives.hico import HiCo
from mohico.models.objectives.mcl import MCL

OBJECTIVES: dict[str, Callable[[Config, nn.Module], Objective]] = {"mcl": MCL, "hico": HiCo}

__all__ = ["OBJECTIVES", "MCL", "HiCo", "Objective"]
