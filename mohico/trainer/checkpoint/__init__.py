"""Checkpoints of a training run, one module per job:

- :mod:`.layout`        where each file lives (finding and reading checkpoints: :mod:`mohico.checkpoint_read`)
- :mod:`.checkpointer`  :class:`Checkpointer`: the atomic save protocol and loading of the run's states
- :mod:`.verify`        sha256 digests of every file, recorded at save time and checked at resume
- :mod:`.resume`        :func:`find_resume`: which checkpoint a run resumes from (fallback past damaged ones)
- :mod:`.config_check`  may this config resume that checkpoint (the config hash, the shards' fingerprint)
- :mod:`.universal`     the world-size conversion of DeepSpeed's files (universal form)

What a checkpoint holds is decided by the states the trainer lists (:mod:`mohico.trainer.states`).

The names below are imported on first use (``ck.Checkpointer`` imports torch then): `mohico train
--dry-run` reads a checkpoint's config through :mod:`.config_check` and :mod:`.layout` without torch.
"""
from __future__ import annotations

import importlib

_HOME = {
    "load_backbone_state": "mohico.checkpoint_read", "load_module_state": "mohico.checkpoint_read",
    "safe_load": "mohico.checkpoint_read",
    "Checkpointer": ".checkpointer", "load_rank_state": ".checkpointer", "load_rank_states": ".checkpointer",
    "check_config": ".config_check",
    **{name: ".layout" for name in ("FORMAT", "LATEST", "META", "TAG_RE", "TMP_PREFIX", "checkpoint_dir",
                                    "client_file", "complete_tags", "read_latest", "read_meta",
                                    "resolve_checkpoint", "tag_for")},
    "Resume": ".resume", "find_resume": ".resume", "pick_resume": ".resume",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value
