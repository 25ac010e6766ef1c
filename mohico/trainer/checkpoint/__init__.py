"""Checkpoints of a training run, one module per job:

- :mod:`.layout`        where each file lives (finding and reading checkpoints: :mod:`mohico.checkpoint_read`)
- :mod:`.checkpointer`  :class:`Checkpointer`: the atomic save protocol and loading of the run's states
- :mod:`.verify`        sha256 digests of every file, recorded at save time and checked at resume
- :mod:`.resume`        :func:`find_resume`: which checkpoint a run resumes from (fallback past damaged ones)
- :mod:`.config_check`  may this config resume that checkpoint (the config hash, the shards' fingerprint)
- :mod:`.universal`     the world-size conversion of DeepSpeed's files (universal form)

What a checkpoint holds is decided by the states the trainer lists (:mod:`mohico.trainer.states`).
"""
from mohico.checkpoint_read import load_backbone_state, load_module_state, safe_load  # noqa: F401
from mohico.trainer.checkpoint.checkpointer import Checkpointer, load_rank_state, load_rank_states  # noqa: F401
from mohico.trainer.checkpoint.config_check import check_config  # noqa: F401
from mohico.trainer.checkpoint.layout import (FORMAT, LATEST, META, TAG_RE, TMP_PREFIX,  # noqa: F401
                                              checkpoint_dir, client_file, complete_tags, read_latest, read_meta,
                                              resolve_checkpoint, tag_for)
from mohico.trainer.checkpoint.resume import Resume, find_resume, pick_resume  # noqa: F401
