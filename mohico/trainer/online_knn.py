"""Online kNN monitor during pretraining (solo-learn's online kNN): every ``eval.every_steps``
steps rank 0 embeds a small labelled shard set with the *current* online backbone and logs kNN
top-1/top-5 (``knn/top1``, ``knn/top5``, ``knn/time_s``) to W&B and ``metrics.jsonl``.

Cheap and side-effect free: deterministic centre clips (:func:`mohico.eval.protocols.features`,
no augmentation, no cache), ``torch.no_grad``, the backbone in eval mode (BatchNorm statistics are
read, not updated) and put back in its previous mode, no optimiser state touched, and the CPU
RNG streams saved and restored around it -- a run with the monitor on follows the same
trajectory, bit for bit, as one with it off, and resumes exactly. Voters: ``eval.train_shards``,
or ``eval.val_shards`` itself with each video excluded from its own vote (leave-one-out).
Labels: the shards' or ``eval.labels`` (a labels file). A failing evaluation logs a warning and
training goes on (``knn/failed`` = 1 in that row).
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from mohico.trainer.rng import preserved_rng
from mohico.datasets.shard_list import expand_shards
from mohico.datasets.write.shards_inputs import load_labels
from mohico.eval.protocols import features, knn

log = logging.getLogger("mohico.trainer")


class OnlineKnn:
    """``due(step)`` -> bool; ``run(backbone) -> {"knn/top1", "knn/top5", "knn/time_s"}``."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.ev, self.device = cfg, cfg.eval, torch.device(device)
        self.val = self.ev.val_shards
        self.train = self.ev.train_shards or self.ev.val_shards
        for shards in {self.val, self.train}:
            expand_shards(shards, allow_commands=cfg.data.allow_commands)   # a wrong path fails at start-up
        self.labels = load_labels(self.ev.labels) if self.ev.labels else None

    def due(self, step: int) -> bool:
        return self.ev.every_steps > 0 and step % self.ev.every_steps == 0

    @torch.no_grad()
    def run(self, backbone: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        was_training = backbone.training
        try:
            with preserved_rng():
                row = self._evaluate(backbone)
        except Exception as e:  # noqa: BLE001 - a monitor must not stop training
            log.warning("online kNN failed (%s: %s); training continues", type(e).__name__, e)
            row = {"knn/failed": 1.0}
        finally:
            backbone.train(was_training)
        row["knn/time_s"] = time.perf_counter() - t0
        return row

    def _evaluate(self, backbone: nn.Module) -> dict[str, float]:
        common = dict(labels=self.labels, clips_per_video=self.ev.clips_per_video, batch_size=self.ev.batch_size,
                      device=self.device)
        val = features(backbone, self.cfg, self.val, where="eval.val_shards", **common)
        train = val if self.train == self.val else features(backbone, self.cfg, self.train,
                                                              where="eval.train_shards", **common)
        res = knn(train, val, k=self.ev.k, temperature=self.ev.temperature)
        return {"knn/top1": res["top1"], "knn/top5": res["top5"]}
