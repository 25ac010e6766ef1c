"""PretrainModule: backbone + heads + objectives; the ``nn.Module`` the DeepSpeed engine wraps.

Its forward returns the loss, so MCL's double backprop (MAL) happens inside the engine's
module (docs/DEPENDENCIES.md, DeepSpeed: it fails on tensors that leave the engine).

    model = PretrainModule(cfg)
    loss, terms = model(batch.clips, batch.motion, progress, batch.video_id)   # engine(...) in training
    engine.backward(loss); engine.step(); model.momentum_update()

Views: ``clips: (B, V, C, T, H, W)`` with ``V = cfg.objectives.num_views`` (said once, in the
config: 2 with MCL alone (query, key), 4 with MCL's official variant (query, query re-augmented,
two keys), 3 with HiCo (v_i, v_j, v_k; v_i / v_j double as MCL's query / key)). Each objective
(the :class:`~mohico.models.objectives.base.Objective` protocol) declares what it reads: ``online_views`` (views the online backbone encodes for it),
``key_views`` and ``key_head`` (the views and the online head whose EMA copy makes its keys),
``needs_features`` (the late feature map and motion, for MAL). The online backbone runs once on the union of the online views, concatenated view-major (``V' * B`` clips,
one set of BN statistics), with the late feature map when an objective needs it. The model's
one :class:`KeyEncoder` (EMA backbone + the objectives' EMA heads) runs its backbone once on
the key views (concatenated view-major) when any objective needs keys this step; each
objective's keys are its EMA head over that one embedding. :meth:`momentum_update` is the one EMA update per optimizer step.

``model.init`` (2D ImageNet weights, :mod:`mohico.models.inflate`) is loaded into the backbone as
it is built, before the key encoder copies it; the trainer builds a resumed run's module without
it (:func:`without_init`): a resumed run takes its checkpoint's weights.

Memory banks are per-rank state kept *out* of ``state_dict()`` (DeepSpeed must neither
broadcast nor partition them); :meth:`banks` is what the trainer saves per rank and reshards
when the world size changed (``mohico.trainer.states.BanksState``).
"""
from __future__ import annotations

import torch
from torch import nn

from mohico import dist
from mohico.config import Config
from mohico.config_validate import check_pretrain
from mohico.errors import ConfigError, MohicoError
from mohico.models.backbones import build_backbone
from mohico.models.bank import MemoryBank
from mohico.models.inflate import load_init
from mohico.models.key_encoder import KeyEncoder
from mohico.models.objectives import OBJECTIVES


def without_init(cfg: Config) -> Config:
    """``cfg`` with ``model.init`` emptied: what a resumed run builds its module from (its weights
    come from the checkpoint; the 2D file is neither read nor needed)."""
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=""))


class PretrainModule(nn.Module):
    """``backbone`` + ``objectives`` (an ``nn.ModuleDict`` of the enabled ones, in registry order)
    + ``key_encoder`` (the shared :class:`KeyEncoder`; None when no objective makes keys)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        check_pretrain(cfg)                     # a config built in code: at least one objective, MCL's bank
        enabled = cfg.objectives.enabled
        self.weights = {name: float(getattr(cfg.objectives, name).weight) for name in enabled}
        self.num_views = cfg.objectives.num_views
        backbone = build_backbone(cfg.model.backbone, **cfg.model.backbone_options)
        if cfg.model.init:                      # 2D ImageNet weights, before every copy of the backbone
            load_init(backbone, cfg.model.init)     # (the trainer builds a resumed run without it)
        sync = [name for name in enabled if getattr(cfg.objectives, name).bn == "sync"]
        if sync:                                                    # either objective asks: the whole model
            if dist.is_distributed() and not torch.cuda.is_available():
                raise ConfigError(f"'objectives.{sync[0]}.bn': SyncBatchNorm needs GPUs to synchronise across "
                                  f"ranks; on CPU use objectives.{sync[0]}.bn=shuffle")
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
        self.backbone = backbone
        objectives = nn.ModuleDict({name: OBJECTIVES[name](cfg, backbone) for name in enabled})
        self.objectives = nn.SyncBatchNorm.convert_sync_batchnorm(objectives) if sync else objectives
        for name, obj in self.objectives.items():
            if max(obj.online_views + obj.key_views) >= self.num_views:
                raise ConfigError(f"'objectives.{name}': reads views {obj.online_views} and key views {obj.key_views} "
                                  f"but the loader draws {self.num_views} per video (objectives.num_views)")
        self.online_views = sorted(set().union(*(obj.online_views for obj in self.objectives.values())))
        self.key_encoder, self.key_views = self._build_key_encoder(cfg)
        self._register_load_state_dict_pre_hook(_rename_pre_key_encoder_keys)

    def _build_key_encoder(self, cfg: Config) -> tuple[KeyEncoder | None, tuple[int, ...] | None]:
        """The one EMA key encoder: copies of the backbone and of every objective's ``key_head``.
        The first objective with keys (registry order: MCL before HiCo) sets the backbone copy's
        momentum and BN mode (``objectives.<name>.momentum`` / ``bn``)."""
        keyed = {name: obj for name, obj in self.objectives.items() if obj.key_head is not None}
        if not keyed:
            return None, None
        if cfg.trainer.zero_stage >= 3:
            raise ConfigError("'trainer.zero_stage': the momentum key encoder (MCL's keys, HiCo's bank keys) is "
                              "updated outside the forward and ZeRO-3 partitions its parameters; use zero_stage "
                              "0, 1 or 2")
        views = {obj.key_views for obj in keyed.values()}
        if len(views) != 1:
            raise ConfigError(f"'objectives': the objectives {sorted(keyed)} want keys of different views {views}; "
                              f"the shared key encoder encodes one")
        owner = getattr(cfg.objectives, next(iter(keyed)))
        encoder = KeyEncoder(self.backbone, {name: obj.key_head for name, obj in keyed.items()}, owner.momentum,
                             {name: getattr(cfg.objectives, name).momentum for name in keyed},
                             shuffle=owner.bn == "shuffle")
        return encoder, views.pop()

    # ------------------------------------------------------------------ training step
    def forward(self, clips: torch.Tensor, motion: torch.Tensor | None, progress: float | torch.Tensor = 0.0,
                video_id: torch.Tensor | None = None):
        """``clips: (B, V, C, T, H, W)``, ``motion: (B, V, T, Hm, Wm)`` (None without MAL),
        ``progress`` in [0, 1], ``video_id: (B,)`` int64 (the batch's ``video_id``; None: every
        sample its own video) -> ``(loss, terms)``: a scalar tensor and a dict of detached
        scalar tensors (every objective term, the bank fills, ``loss``). With ids, no objective
        takes a clip or bank key of the query's own video as a negative, and the banks store
        the ids with the keys. In training mode the
        step's keys are enqueued into the banks; in ``eval()`` mode the banks are untouched.
        Under ``torch.no_grad()`` the gradient-based MAL variants are skipped (no double backprop)."""
        if clips.ndim != 6 or clips.shape[1] < self.num_views:
            raise MohicoError(f"PretrainModule takes clips (B, V>={self.num_views}, C, T, H, W) for objectives "
                              f"{list(self.objectives)}; got {tuple(clips.shape)} (HiCo needs 3 views per video)")
        progress = float(progress)
        b = clips.shape[0]
        with_features = any(obj.needs_features for obj in self.objectives.values())
        if with_features and (motion is None or motion.ndim != 5 or motion.shape[:2] != clips.shape[:2]):
            got = None if motion is None else tuple(motion.shape)
            raise MohicoError(f"MCL's motion alignment loss needs motion (B, V, T, Hm, Wm) matching clips "
                              f"{tuple(clips.shape[:2])}; got {got} (or set objectives.mcl.mal_enabled=false)")
        views = self.online_views
        x = clips[:, views].transpose(0, 1).reshape(len(views) * b, *clips.shape[2:])
        out = self.backbone(x, return_features=True) if with_features else self.backbone(x)
        emb, fmap = out if with_features else (out, None)            # fmap rows: view-major, views[0] first
        emb = emb.reshape(len(views), b, -1)
        wants_keys = [name for name, obj in self.objectives.items() if obj.key_head is not None and obj.needs_keys()]
        key_emb = None
        if wants_keys:                                                # the key views, view-major: (V' * B, ...)
            kv = list(self.key_views)
            key_emb = self.key_encoder.embed(clips[:, kv].transpose(0, 1).reshape(len(kv) * b, *clips.shape[2:]))

        loss = emb.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for name, obj in self.objectives.items():
            keys = obj.project_keys(self.key_encoder.heads[name], key_emb) if name in wants_keys else None
            mine = emb[[views.index(v) for v in obj.online_views]].transpose(0, 1)     # (B, v, D)
            part, t = obj(mine, keys, fmap=fmap, motion=motion, progress=progress, video_id=video_id)
            loss = loss + self.weights[name] * part
            terms.update(t)
            terms[f"{name}/loss"] = part.detach()
        terms["loss"] = loss.detach()
        return loss, {k: v.detach().float() for k, v in terms.items()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """The one EMA update of the key encoder (backbone copy and every objective's head copy);
        call after every optimizer step. Nothing to do without a key encoder."""
        if self.key_encoder is not None:
            self.key_encoder.momentum_update(self.backbone, {name: self.objectives[name].key_head
                                                            for name in self.key_encoder.heads})

    # ------------------------------------------------------------------ memory banks
    def banks(self) -> dict[str, MemoryBank]:
        """The memory banks by objective name (``mcl``, ``hico``)."""
        return {name: obj.bank for name, obj in self.objectives.items() if obj.bank is not None}


_PRE_KEY_ENCODER_NAMES = (("objectives.mcl.key_backbone.", "key_encoder.backbone."),
                          ("objectives.hico.key_backbone.", "key_encoder.backbone."),
                          ("objectives.mcl.key_proj.", "key_encoder.heads.mcl."),
                          ("objectives.hico.key_visual.", "key_encoder.heads.hico."))


def _rename_pre_key_encoder_keys(state_dict, prefix, *_args) -> None:
    """Load-time rename of checkpoints written before the shared :class:`KeyEncoder` (the EMA
    parts then lived in the objectives: ``objectives.mcl.key_backbone.*``, ...)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in _PRE_KEY_ENCODER_NAMES:
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
                break
