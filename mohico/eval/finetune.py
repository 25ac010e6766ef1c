"""Fine-tuning protocol: the whole backbone plus a new linear head trained end to end on labelled
clips, through the pretraining machinery (DeepSpeed engine, checkpoints and exact resume, W&B,
``mohico train`` / ``mohico submit`` / SLURM), then multi-clip test accuracy.

A config with ``finetune.backbone`` set (a run directory, checkpoint, exported backbone file,
torchvision state_dict, or ``random`` for training from scratch) makes ``mohico train`` build
:class:`FinetuneModule` instead of the pretraining module. The loader is the pretraining loader
on ``data.shards`` (its random crops, flips and colour augmentation; each of a video's ``V``
views is one training clip); labels come from the shards' json ``label`` or
``finetune.labels`` (a labels file), looked up by ``batch.video_id`` (the key's stable hash,
which the trainer already passes to the module). Videos without a label are ignored by the loss
(``finetune/unlabelled_frac`` logged). Classes: sorted labels of the train shards (``finetune.num_classes``,
when set, must match).

Loss: cross-entropy (``finetune.label_smoothing``) of ``head(dropout(backbone(clip)))``; terms
``loss``, ``finetune/top1`` (train-batch accuracy) and ``finetune/unlabelled_frac``. Every ``eval.every_steps``
rank 0 logs validation top-1 (``mohico.trainer.online_knn.FinetuneVal``: ``finetune/val_top1``). After the last step rank 0 runs :func:`finetune_test`:
``finetune.test_clips`` temporal clips x ``finetune.test_crops`` spatial crops per test video
(``finetune.test_shards``), softmax averaged -> top-1/top-5, written to ``RUN_DIR/finetune_test.json``,
printed as a table and logged to the run's W&B run (``eval/finetune/*``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from mohico.errors import ConfigError, MohicoError
from mohico.checkpoint_read import load_module_state
from mohico.datasets.load.eval_clips import iter_labelled
from mohico.datasets.load.sampling import stable_hash
from mohico.datasets.sample_schema import sample_label, scan_labels
from mohico.datasets.write.shards_inputs import load_labels
from mohico.models.backbones import build_backbone
from mohico.eval.features import class_index
from mohico.eval.report import log_wandb, results_table, write_results
from mohico.eval.knn import load_eval_backbone, topk_accuracy

log = logging.getLogger("mohico.trainer")
IGNORE = -100


def sorted_classes(values) -> list:
    return class_index(list(values))[0]


class FinetuneModule(nn.Module):
    """Backbone + dropout + linear head. ``forward(clips (B, V, C, T, H, W), motion, progress,
    video_id (B,)) -> (loss, {"loss", "finetune/top1", "finetune/unlabelled_frac"})``; the trainer's bank/EMA hooks are no-ops."""

    def __init__(self, cfg, load_pretrained: bool = True):
        super().__init__()

        ft = cfg.finetune
        labels = load_labels(ft.labels) if ft.labels else None
        by_key = scan_labels(cfg.data.shards, labels)
        if not by_key:
            raise ConfigError(f"'data.shards': no labelled video in {cfg.data.shards}; fine-tuning needs labels "
                              f"(mohico shards --labels / --layout, or finetune.labels=FILE)")
        self.classes = sorted_classes(by_key.values())
        if ft.num_classes and ft.num_classes != len(self.classes):
            raise ConfigError(f"'finetune.num_classes': {ft.num_classes}, but the train shards hold "
                              f"{len(self.classes)} classes ({self.classes[:5]}...); set it to 0 (from the data)")
        index = {c: i for i, c in enumerate(self.classes)}
        ids = torch.tensor([stable_hash(k) >> 1 for k in by_key], dtype=torch.int64)
        cls = torch.tensor([index[v] for v in by_key.values()], dtype=torch.int64)
        order = ids.argsort()
        self.register_buffer("label_ids", ids[order], persistent=False)
        self.register_buffer("label_classes", cls[order], persistent=False)
        self.backbone = (load_eval_backbone(ft.backbone, cfg) if load_pretrained
                         else build_backbone(cfg.model.backbone, **cfg.model.backbone_options))
        self.dropout = nn.Dropout(ft.dropout)
        self.head = nn.Linear(self.backbone.out_dim, len(self.classes))
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = float(ft.label_smoothing)

    def labels_of(self, video_id: torch.Tensor) -> torch.Tensor:
        """``(B,)`` class indices of ``video_id: (B,)``; ``IGNORE`` for videos without a label."""
        pos = torch.searchsorted(self.label_ids, video_id).clamp(max=len(self.label_ids) - 1)
        found = self.label_ids[pos] == video_id
        return torch.where(found, self.label_classes[pos], torch.full_like(video_id, IGNORE))

    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        """``clips: (N, C, T, H, W)`` -> ``(N, num_classes)``."""
        return self.head(self.dropout(self.backbone(clips)))

    def forward(self, clips: torch.Tensor, motion=None, progress=0.0, video_id: Optional[torch.Tensor] = None):
        if clips.ndim != 6 or video_id is None:
            raise MohicoError(f"FinetuneModule takes clips (B, V, C, T, H, W) and video_id (B,); got "
                              f"{tuple(clips.shape)}, video_id={'None' if video_id is None else tuple(video_id.shape)}")
        b, v = clips.shape[:2]
        y = self.labels_of(video_id).repeat_interleave(v)                  # (B*V,), views of a video share it
        logits = self.logits(clips.flatten(0, 1))
        valid = y != IGNORE
        if bool(valid.any()):
            loss = nn.functional.cross_entropy(logits, y, ignore_index=IGNORE, label_smoothing=self.label_smoothing)
        else:
            loss = logits.sum() * 0.0                                      # keeps the graph (every rank steps)
        with torch.no_grad():
            hit = (logits.argmax(dim=1) == y) & valid
            top1 = hit.sum().float() / valid.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "finetune/top1": top1,
                      "finetune/unlabelled_frac": 1.0 - valid.float().mean()}

    # the trainer's pretraining hooks: nothing to do
    def momentum_update(self) -> None:
        pass

    def banks(self) -> dict:
        return {}


@torch.no_grad()
def video_scores(module: FinetuneModule, videos, labels: Optional[dict], batch_size: int, device, where: str):
    """Softmax of ``module.logits`` averaged over each labelled video's clips: ``(scores (N, C), ys (N,),
    keys, unlabelled count)``; ``videos`` yields :class:`~mohico.datasets.load.eval_clips.LabelledVideo`
    (clips ``(V, C, T, H, W)``); labels as :func:`~mohico.datasets.sample_schema.sample_label`. The
    caller sets eval mode. A label no train video has raises MohicoError naming ``where``."""
    index = {c: i for i, c in enumerate(module.classes)}
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    probs, ys, keys, skipped = [], [], [], 0
    for v in videos:
        lab = sample_label(labels, v.source, v.key, v.label)
        if lab is None:
            skipped += 1
            continue
        if lab not in index:
            raise MohicoError(f"{where}: video {v.source or v.key} has label {lab!r}, which no train "
                              f"video has (classes: {module.classes[:8]}...)")
        p = []
        for s in range(0, len(v.clips), batch_size):
            x = torch.from_numpy(v.clips[s:s + batch_size]).to(device, dtype)
            p.append(torch.softmax(module.logits(x).float(), dim=1).cpu())
        probs.append(torch.cat(p).mean(dim=0))
        ys.append(index[lab])
        keys.append(v.key)
    if not probs:
        raise MohicoError(f"{where}: no labelled video")
    return torch.stack(probs), torch.tensor(ys), keys, skipped


@torch.no_grad()
def finetune_test(cfg, progress: bool = False, open_run=None) -> dict:
    """Multi-clip test accuracy of the run's latest checkpoint (module docstring); writes
    ``RUN_DIR/finetune_test.json`` and logs ``eval/finetune/*`` to the run's W&B run, opened by
    ``open_run`` (:func:`mohico.eval.report.log_wandb`; None: no W&B)."""
    from tqdm import tqdm

    ft = cfg.finetune
    run_dir = Path(cfg.run.dir)
    state, meta = load_module_state(run_dir)
    module = FinetuneModule(cfg, load_pretrained=False)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MohicoError(f"{run_dir}: the checkpoint is not this fine-tuning module's (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.eval().to(device)

    labels = load_labels(ft.labels) if ft.labels else None
    videos = iter_labelled(ft.test_shards, cfg.data, ft.test_clips, "finetune.test_shards", ft.test_crops,
                           require_label=False)
    videos = tqdm(videos, desc="finetune test", unit="video", disable=not progress, dynamic_ncols=True)
    scores, ys, keys, skipped = video_scores(module, videos, labels, ft.test_batch_size, device,
                                             f"finetune.test_shards {ft.test_shards}")
    acc = topk_accuracy(scores, ys, (1, 5))
    res = {"protocol": "finetune", **acc, "num_test": len(ys), "unlabelled_test": skipped,
           "num_classes": len(module.classes), "clips_per_video": ft.test_clips, "spatial_crops": ft.test_crops,
           "step": int(meta.get("step", 0)), "run_dir": str(run_dir),
           "per_video": [{"key": k, "label": module.classes[y], "pred": module.classes[int(s.argmax())]}
                         for k, y, s in zip(keys, ys.tolist(), scores)]}
    print(results_table(res))
    print(f"fine-tuned {cfg.model.backbone} on {len(ys)} test videos, {ft.test_clips} clip(s) x {ft.test_crops} "
          f"crop(s): top-1 {100 * acc['top1']:.2f}%  top-5 {100 * acc['top5']:.2f}%")
    write_results(res, run_dir / "finetune_test.json")
    if open_run is not None:
        log_wandb(res, run_dir, None, open_run, into_run=True)     # the run's own result, at its last step
    return res
