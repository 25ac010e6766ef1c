"""PretrainModule: backbone + heads + objectives; the ``nn.Module`` the DeepSpeed engine wraps.

Its forward returns the loss, so MCL's double backprop (MAL) happens inside the engine's
module (recipes.md: it fails on tensors that leave the engine).

    model = PretrainModule(cfg)
    loss, terms = model(batch["clips"], batch["motion"], progress)   # engine(...) in training
    engine.backward(loss); engine.step(); model.momentum_update()

Views: ``clips: (B, V, C, T, H, W)``. With MCL alone V = 2 (query, key); with HiCo V = 3
(v_i, v_j, v_k) and v_i / v_j double as MCL's query / key. The online backbone runs once on
the views it needs, concatenated view-major (``V' * B`` clips, one set of BN statistics), with
the late feature map when MAL is on. The momentum (EMA) backbone runs separately on view 1
(MCL's key view, HiCo's ``v_j``): MCL owns it when MCL is on and its embedding is computed once
(:meth:`MCL.key_embed`) and shared with HiCo's bank keys; with HiCo alone HiCo owns its copy.
:meth:`momentum_update` updates every EMA part once per optimizer step.

Memory banks are per-rank state kept *out* of ``state_dict()`` (DeepSpeed must neither
broadcast nor partition them); the trainer saves them per rank with :meth:`bank_state_dict`
and restores them with :meth:`load_bank_state_dict`, after :meth:`reshard_bank_states` when
the world size changed.
"""
from __future__ import annotations

import torch
from torch import nn

from mohico import dist
from mohico.config import Config
from mohico.errors import ConfigError, MohicoError
from mohico.models.backbones import build_backbone
from mohico.models.bank import MemoryBank
from mohico.models.objectives import OBJECTIVES


class PretrainModule(nn.Module):
    """``backbone`` + ``objectives`` (an ``nn.ModuleDict`` of the enabled ones, in registry order)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        enabled = [name for name in OBJECTIVES if getattr(cfg.objectives, name).weight > 0]
        if not enabled:
            raise ConfigError("'objectives': no objective is enabled: set objectives.mcl.weight or "
                              "objectives.hico.weight > 0")
        hico_ema = "hico" in enabled and cfg.objectives.hico.use_bank and cfg.bank.size > 0
        if ("mcl" in enabled or hico_ema) and cfg.trainer.zero_stage >= 3:
            raise ConfigError("'trainer.zero_stage': the momentum key encoder (MCL's, HiCo's bank keys) is updated "
                              "outside the forward and ZeRO-3 partitions its parameters; use zero_stage 0, 1 or 2")
        self.weights = {name: float(getattr(cfg.objectives, name).weight) for name in enabled}
        backbone = build_backbone(cfg.model.backbone, **cfg.model.backbone_options)
        sync = [name for name in enabled if getattr(cfg.objectives, name).bn == "sync"]
        if sync:                                                    # either objective asks: the whole model
            if dist.is_distributed() and not torch.cuda.is_available():
                raise ConfigError(f"'objectives.{sync[0]}.bn': SyncBatchNorm needs GPUs to synchronise across "
                                  f"ranks; on CPU use objectives.{sync[0]}.bn=shuffle")
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
        self.backbone = backbone
        objectives = nn.ModuleDict({name: OBJECTIVES[name](cfg, backbone) for name in enabled})
        self.objectives = nn.SyncBatchNorm.convert_sync_batchnorm(objectives) if sync else objectives
        self.num_views = 3 if "hico" in enabled else 2

    # ------------------------------------------------------------------ training step
    def forward(self, clips: torch.Tensor, motion: torch.Tensor | None, progress: float | torch.Tensor = 0.0,
                video_id: torch.Tensor | None = None):
        """``clips: (B, V, C, T, H, W)``, ``motion: (B, V, T, Hm, Wm)`` (None without MAL),
        ``progress`` in [0, 1], ``video_id: (B,)`` int64 (``batch["video_id"]``; None: every
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
        mcl, hico = self.objectives["mcl"] if "mcl" in self.objectives else None, \
            self.objectives["hico"] if "hico" in self.objectives else None
        online = 3 if hico is not None else 1
        x = clips[:, :online].transpose(0, 1).reshape(online * b, *clips.shape[2:])
        with_features = mcl is not None and mcl.needs_features
        out = self.backbone(x, return_features=True) if with_features else self.backbone(x)
        emb, fmap = out if with_features else (out, None)
        emb = emb.reshape(online, b, -1)

        loss = emb.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        key_emb = None                                              # the EMA backbone's embedding of view 1
        if mcl is not None:
            motion_q = None
            if mcl.needs_features:
                if motion is None or motion.ndim != 5 or motion.shape[:2] != clips.shape[:2]:
                    got = None if motion is None else tuple(motion.shape)
                    raise MohicoError(f"MCL's motion alignment loss needs motion (B, V, T, Hm, Wm) matching clips "
                                      f"{tuple(clips.shape[:2])}; got {got} (or set objectives.mcl.mal_enabled=false)")
                motion_q = motion[:, 0]
            key_emb = mcl.key_embed(clips[:, 1])
            part, t = mcl(emb[0], fmap, clips[:, 1], motion_q, progress, key_emb=key_emb, video_id=video_id)
            loss = loss + self.weights["mcl"] * part
            terms.update(t)
            terms["mcl/loss"] = part.detach()
        if hico is not None:
            part, t = hico(emb.transpose(0, 1), clips[:, 1], key_emb, video_id=video_id)
            loss = loss + self.weights["hico"] * part
            terms.update(t)
            terms["hico/loss"] = part.detach()
        terms["loss"] = loss.detach()
        return loss, {k: v.detach().float() for k, v in terms.items()}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA update of the key encoders (MCL's; HiCo's bank-key head and, without MCL, its
        backbone copy); call after every optimizer step."""
        for objective in self.objectives.values():
            objective.momentum_update(self.backbone)

    # ------------------------------------------------------------------ memory banks
    def banks(self) -> dict[str, MemoryBank]:
        """The memory banks by objective name (``mcl``, ``hico``)."""
        return {name: obj.bank for name, obj in self.objectives.items() if getattr(obj, "bank", None) is not None}

    def bank_state_dict(self) -> dict[str, dict]:
        """This rank's bank shards: ``{objective name: MemoryBank.state_dict()}``."""
        return {name: bank.state_dict() for name, bank in self.banks().items()}

    def load_bank_state_dict(self, states: dict[str, dict]) -> None:
        """Restore this rank's shards from :meth:`bank_state_dict` output (same world size)."""
        banks = self.banks()
        if set(states) != set(banks):
            raise MohicoError(f"bank checkpoint holds banks {sorted(states)} but this model has {sorted(banks)}: "
                              f"the checkpoint is from a run with other objectives (objectives.*.weight, "
                              f"objectives.hico.use_bank); resume with the same objectives")
        for name, bank in banks.items():
            bank.load_state_dict(states[name])

    @staticmethod
    def reshard_bank_states(per_rank: list[dict[str, dict]], new_world_size: int) -> list[dict[str, dict]]:
        """All ranks' :meth:`bank_state_dict` outputs -> the same for ``new_world_size`` ranks."""
        names = sorted(per_rank[0]) if per_rank else []
        if any(sorted(s) != names for s in per_rank):
            raise MohicoError("reshard_bank_states: the ranks' bank files hold different banks; "
                              "they are not from one checkpoint")
        out = [{} for _ in range(new_world_size)]
        for name in names:
            for r, state in enumerate(MemoryBank.reshard([s[name] for s in per_rank], new_world_size)):
                out[r][name] = state
        return out
