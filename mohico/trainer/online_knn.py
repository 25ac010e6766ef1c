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

A fine-tuning run (``finetune.backbone`` set) gets :class:`FinetuneVal` instead, with the same
guarantees: top-1 of the whole module (backbone + head) on held-out videos (``finetune/val_*``).
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from mohico.trainer.rng import preserved_rng
from mohico.datasets.shard_list import expand_shards
from mohico.datasets.write.shards_inputs import load_labels
from mohico.datasets.load.eval_clips import iter_labelled
from mohico.eval.finetune import video_scores
from mohico.eval.knn import topk_accuracy
from mohico.eval.protocols import features, knn

log = logging.getLogger("mohico.trainer")


class OnlineKnn:
    """``due(step)`` -> bool; ``run(module) -> {"knn/top1", "knn/top5", "knn/time_s"}`` of
    ``evaluated(module)`` (the training module's backbone)."""

    prefix, name = "knn/", "online kNN"      # the row's keys; the warning's subject

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.ev, self.device = cfg, cfg.eval, torch.device(device)
        self.val = self.ev.val_shards
        self.train = self.ev.train_shards or self.ev.val_shards
        for shards in {self.val, self.train}:
            expand_shards(shards, allow_commands=cfg.data.allow_commands)   # a wrong path fails at start-up
        self.labels = load_labels(self.ev.labels) if self.ev.labels else None

    def due(self, step: int) -> bool:
        return self.ev.every_steps > 0 and step % self.ev.every_steps == 0

    def evaluated(self, module: nn.Module) -> nn.Module:
        return module.backbone

    @torch.no_grad()
    def run(self, module: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        net = self.evaluated(module)
        was_training = net.training
        try:
            with preserved_rng():
                row = self._evaluate(net)
        except Exception as e:  # noqa: BLE001 - a monitor must not stop training
            log.warning("%s failed (%s: %s); training continues", self.name, type(e).__name__, e)
            row = {f"{self.prefix}failed": 1.0}
        finally:
            net.train(was_training)
        row[f"{self.prefix}time_s"] = time.perf_counter() - t0
        return row

    def _evaluate(self, backbone: nn.Module) -> dict[str, float]:
        common = dict(labels=self.labels, clips_per_video=self.ev.clips_per_video, batch_size=self.ev.batch_size,
                      device=self.device)
        val = features(backbone, self.cfg, self.val, where="eval.val_shards", **common)
        train = val if self.train == self.val else features(backbone, self.cfg, self.train,
                                                              where="eval.train_shards", **common)
        res = knn(train, val, k=self.ev.k, temperature=self.ev.temperature)
        return {"knn/top1": res["top1"], "knn/top5": res["top5"]}


class FinetuneVal(OnlineKnn):
    """Validation top-1 while fine-tuning (rank 0, every ``eval.every_steps``): ``eval.clips_per_video``
    centre clips of every video of ``eval.val_shards`` (else ``finetune.test_shards``), softmax averaged
    -> ``finetune/val_top1``, ``finetune/val_top5``, ``finetune/val_time_s``. Same guarantees as the
    online kNN it extends (eval mode restored, no grad, RNG streams restored, a failure only warns)."""

    prefix, name = "finetune/val_", "validation top-1"

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.ev, self.device = cfg, cfg.eval, torch.device(device)
        self.val = self.ev.val_shards or cfg.finetune.test_shards
        self.where = f"{'eval.val_shards' if self.ev.val_shards else 'finetune.test_shards'} {self.val}"
        expand_shards(self.val, allow_commands=cfg.data.allow_commands)        # a wrong path fails at start-up
        labels = self.ev.labels or cfg.finetune.labels
        self.labels = load_labels(labels) if labels else None

    def evaluated(self, module: nn.Module) -> nn.Module:
        return module                                                          # backbone + head

    def _evaluate(self, module: nn.Module) -> dict[str, float]:
        module.eval()
        videos = iter_labelled(self.val, self.cfg.data, self.ev.clips_per_video, self.where, require_label=False)
        scores, ys, _, _ = video_scores(module, videos, self.labels, self.ev.batch_size, self.device, self.where)
        return {f"{self.prefix}{k}": v for k, v in topk_accuracy(scores, ys, (1, 5)).items()}
