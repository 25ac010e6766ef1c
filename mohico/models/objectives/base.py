"""What ``PretrainModule`` asks of a pretraining objective: the :class:`Objective` protocol.

MCL (``mcl.py``) and HiCo (``hico.py``) implement it; ``OBJECTIVES[name](cfg, backbone)`` builds
one (an ``nn.Module``: its parameters train with the model, ``SyncBatchNorm`` converts it). The
module runs the shared backbone once on the union of the objectives' ``online_views`` and the
shared EMA key encoder once on their common ``key_views``, then calls each objective with its own
slice (``mohico.models.pretrain``). Fine-tuning does not fit here: its head replaces the whole
pretraining module (``FinetuneModule``: backbone + linear head, one cross-entropy), it is not one
objective among several.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mohico.models.bank import MemoryBank


@runtime_checkable
class Objective(Protocol):
    """A pretraining objective over the shared backbone's clip embeddings.

    - ``online_views``: the views (indices into the loader's ``V`` clips per video) whose online
      backbone embeddings it reads, in that order.
    - ``key_views``: the views its keys are made of (by the key encoder's EMA backbone).
    - ``key_head``: the online module whose EMA copy (in the key encoder) projects its keys;
      None: it makes no keys.
    - ``needs_features``: whether it needs the backbone's late feature map and the clips' motion.
    - ``bank``: its memory bank of negatives (per-rank state, kept out of ``state_dict()``), or
      None (``Config.keeps_bank``).
    """

    online_views: tuple[int, ...]
    key_views: tuple[int, ...]
    bank: MemoryBank | None

    @property
    def key_head(self) -> nn.Module | None: ...

    @property
    def needs_features(self) -> bool: ...

    def needs_keys(self) -> bool:
        """Whether this step needs keys (``key_head`` not None and, e.g., training mode)."""
        ...

    def project_keys(self, ema_head: nn.Module, key_emb: torch.Tensor) -> torch.Tensor:
        """Keys: ``ema_head`` (the EMA ``key_head``) over the EMA backbone's embedding
        ``key_emb: (V' * B, D)`` of the ``key_views`` (view-major)."""
        ...

    def __call__(self, emb: torch.Tensor, keys: torch.Tensor | None, fmap: torch.Tensor | None = None,
                 motion: torch.Tensor | None = None, progress: float = 0.0,
                 video_id: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``emb: (B, len(online_views), D)``, ``keys`` from :meth:`project_keys` (None when
        :meth:`needs_keys` said no), ``fmap: (N, C', T', H', W')`` and ``motion: (B, V, T, Hm, Wm)``
        (with ``needs_features``), ``progress`` in [0, 1], ``video_id: (B,)`` int64 ->
        ``(loss, detached terms)``: the objective's unweighted scalar loss and its log terms."""
        ...
