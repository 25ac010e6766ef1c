"""Pretraining objectives, one file per method, and their registry.

``OBJECTIVES[name](cfg, backbone)`` builds the objective ``cfg.objectives.<name>`` around the
shared backbone (which the objective uses but does not own). ``PretrainModule`` enables each
objective whose ``cfg.objectives.<name>.weight > 0``.
"""
from mohico.models.objectives.hico import HiCo
from mohico.models.objectives.mcl import MCL

OBJECTIVES = {"mcl": MCL, "hico": HiCo}

__all__ = ["OBJECTIVES", "MCL", "HiCo"]
