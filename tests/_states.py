"""A plain resumable state for checkpointer tests: ``state_dict()`` returns what it holds,
``load_state_dict`` / ``reshard`` record what they were given."""
from __future__ import annotations

import copy


class Held:
    def __init__(self, state=None):
        self.state = state
        self.resharded = None

    def state_dict(self):
        return copy.deepcopy(self.state)

    def load_state_dict(self, state):
        self.state = copy.deepcopy(state)

    def reshard(self, states, step):
        self.resharded = (copy.deepcopy(states), step)


def states_for(engine, meta: dict, **per_rank) -> dict:
    """``{"engine": EngineState(engine), "train": Held(meta), name: Held(value), ...}``."""
    from mohico.trainer.states import EngineState

    return {"engine": EngineState(engine, meta.get("zero_stage", 0)), "train": Held(meta),
            **{name: Held(value) for name, value in per_rank.items()}}
