"""MCL: motion-focused contrastive learning (Li et al., ICCV 2021; methods.md sections 1.3-1.4).

Query encoder = the shared backbone + :class:`MCLProjection` (``d -> hidden -> ReLU -> 128``,
L2-normalised). Key encoder = an EMA copy of both (momentum 0.999, no gradient), updated by
:meth:`MCL.momentum_update` after every optimizer step. Loss per step::

    L = mean_i NCE(q_i, k+_i, bank; tau = 0.1)  +  lambda * L_MAL

with the NCE against the sharded :class:`mohico.models.bank.MemoryBank` (Eq. 10); the keys
are enqueued *after* the loss (the bank writes out of place, so the loss keeps its keys).
``L_MAL`` (``mal.py``) compares a Grad-CAM style response map of the backbone's late feature
map with the query's motion target; its gradient ``g = d(q . k+)/dA`` is taken here, inside
the forward, with ``torch.autograd.grad(..., create_graph=True)`` (double backprop must
happen inside the module the DeepSpeed engine wraps; recipes.md).

Batch norm (``objectives.mcl.bn``) -- the key encoder must not see the same BN batch as the
query, or the two can "cheat" by matching batch statistics (MoCo section 3.3):

- ``shuffle`` (default, MoCo's shuffling BN): the key batch is shuffled *across ranks* before
  the key encoder and unshuffled after (:func:`shuffled_forward`, two ``all_to_all``), so each rank's key BN
  statistics come from a random subset of the global batch. With one rank the shuffle is a
  permutation inside the batch, which leaves BN statistics unchanged: it is then a no-op and
  gives no protection (use several ranks, or ``bn: sync``).
- ``sync``: the backbone (and so its EMA copy) uses ``SyncBatchNorm`` (statistics over the
  global batch of queries / of keys), converted by ``PretrainModule``. ``SyncBatchNorm``
  needs GPU tensors when it actually synchronises (world size > 1).
- ``none``: plain per-rank BN, no protection.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from mohico.config import Config
from mohico.dist import rank_world
from mohico.errors import ConfigError, MohicoError
from mohico.models.bank import MemoryBank
from mohico.models.heads import MCLProjection
from mohico.models.objectives.mal import mal_loss, mal_weight, needs_gradient, pool_motion, response_map


@torch.no_grad()
def shuffled_forward(encoder, x: torch.Tensor, group=None) -> torch.Tensor:
    """``encoder(x)`` with the batch shuffled across ranks (shuffle BN); ``x: (B, ...)`` -> ``(B, d)``.

    A permutation of the ``B * W`` global samples is drawn on rank 0 and broadcast; rank r
    encodes the samples at positions ``[r*B, (r+1)*B)`` of it, so its BN statistics come from
    a random subset of the global batch. The clips travel with one ``all_to_all`` (each rank
    sends and receives exactly B clips: O(B) memory and traffic per rank, unlike MoCo's
    all-gather of the whole key batch), the outputs come back with a second ``all_to_all``
    and are returned in the original order. With one rank this is ``encoder(x)``. A
    collective: every rank must call it with the same ``B``.
    """
    rank, world = rank_world(group)
    if world == 1:
        return encoder(x)
    b = x.shape[0]
    perm = torch.randperm(b * world, device=x.device) if rank == 0 else torch.empty(b * world, dtype=torch.long,
                                                                                   device=x.device)
    dist.broadcast(perm, src=_global_rank(0, group), group=group)
    position = torch.argsort(perm)                                 # position[g]: where global sample g went
    my_position = position[rank * b + torch.arange(b, device=x.device)]
    send_order = torch.argsort(my_position)                        # grouped by destination rank
    send_counts = torch.bincount(my_position[send_order] // b, minlength=world).tolist()
    recv_counts = torch.bincount(perm[rank * b:(rank + 1) * b] // b, minlength=world).tolist()
    shuffled = torch.empty_like(x)
    dist.all_to_all_single(shuffled, x[send_order].contiguous(), recv_counts, send_counts, group=group)
    out = encoder(shuffled).contiguous()                           # (B, d) for the samples received
    back = torch.empty_like(out)
    dist.all_to_all_single(back, out, send_counts, recv_counts, group=group)
    result = torch.empty_like(back)
    result[send_order] = back
    return result


def _global_rank(group_rank: int, group) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class MCL(nn.Module):
    """The MCL objective around a shared query ``backbone`` (which it does not own).

    Submodules: ``proj`` (query projection), ``key_backbone`` and ``key_proj`` (the EMA key
    encoder, ``requires_grad=False``; part of ``state_dict()``). ``key_backbone`` is the model's
    only EMA backbone when HiCo is on too (its bank keys reuse :meth:`key_embed`). ``bank`` is a plain attribute
    (per-rank state, kept out of ``state_dict()``).
    """

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg.objectives.mcl
        if cfg.bank.size <= 0:
            raise ConfigError("'bank.size': MCL's NCE needs a memory bank of negatives; set bank.size > 0 "
                              "(e.g. 65536) or disable MCL with objectives.mcl.weight=0")
        self.epoch_of_progress = cfg.trainer.max_steps / cfg.trainer.steps_per_epoch
        self.proj = MCLProjection(backbone.out_dim, cfg.model.proj_hidden or None, cfg.model.proj_dim)
        self.key_backbone = copy.deepcopy(backbone)
        self.key_proj = copy.deepcopy(self.proj)
        for p in list(self.key_backbone.parameters()) + list(self.key_proj.parameters()):
            p.requires_grad_(False)
        self.bank = MemoryBank(cfg.bank.size, cfg.bank.dim)

    @property
    def needs_features(self) -> bool:
        """Whether the query forward must return the late feature map (MAL on)."""
        return self.cfg.mal_enabled

    @torch.no_grad()
    def momentum_update(self, backbone: nn.Module) -> None:
        """``key = m * key + (1 - m) * query`` for the backbone and projection parameters.

        The key encoder must hold fp32 parameters: in bfloat16/float16 an update of
        ``(1 - m) = 0.001`` of the difference rounds away (bf16 keeps ~3 significant digits),
        so the key encoder would silently freeze. Use autocast for mixed precision, not
        parameters cast to half precision.
        """
        m = self.cfg.momentum
        half = {p.dtype for p in self.key_backbone.parameters()} & {torch.float16, torch.bfloat16}
        if half and m > 0:
            raise MohicoError(f"MCL's EMA key encoder has {sorted(map(str, half))} parameters: momentum {m} updates "
                              f"would round away. Keep the model in fp32 and use autocast for bf16 "
                              f"(DeepSpeed 'torch_autocast'), not parameters cast to bf16")
        for online, ema in ((backbone, self.key_backbone), (self.proj, self.key_proj)):
            for p_q, p_k in zip(online.parameters(), ema.parameters()):
                p_k.mul_(m).add_(p_q.detach().to(p_k.dtype), alpha=1.0 - m)

    @torch.no_grad()
    def key_embed(self, x_key: torch.Tensor) -> torch.Tensor:
        """The EMA key backbone's embedding ``(B, D)`` of ``x_key: (B, C, T, H, W)`` (shuffle BN
        per ``objectives.mcl.bn``). ``PretrainModule`` computes it once per step and hands it to
        :meth:`forward` and to HiCo, whose bank keys come from the same EMA backbone."""
        if self.cfg.bn == "shuffle":
            return shuffled_forward(self.key_backbone, x_key)
        return self.key_backbone(x_key)

    @torch.no_grad()
    def keys(self, x_key: torch.Tensor, key_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Key embeddings ``(B, proj_dim)`` of ``x_key: (B, C, T, H, W)`` from the EMA encoder
        (``key_emb``: :meth:`key_embed` of ``x_key`` if already computed)."""
        return self.key_proj(self.key_embed(x_key) if key_emb is None else key_emb)

    def forward(self, q_emb: torch.Tensor, fmap: torch.Tensor | None, x_key: torch.Tensor,
                motion_q: torch.Tensor | None, progress: float,
                key_emb: torch.Tensor | None = None,
                video_id: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One MCL step.

        ``q_emb: (B, D)`` backbone embeddings of the query clips; ``fmap: (N, C', T', H', W')``
        the late feature map of the backbone batch that produced them, whose first ``B`` rows
        are the query clips' (the batch may hold more views; needed when MAL is on);
        ``x_key: (B, C, T, H, W)`` the key clips; ``motion_q: (B, T, Hm, Wm)`` the query's
        motion target; ``progress`` in [0, 1] (fraction of ``trainer.max_steps`` done);
        ``key_emb``: :meth:`key_embed` of ``x_key`` if the caller already computed it;
        ``video_id: (B,)`` int64 (``batch["video_id"]``): bank keys of the query's own video are
        not its negatives, and the enqueued keys carry these ids. Returns the loss (NCE + lambda * MAL) and detached terms for logging.
        """
        q = self.proj(q_emb)                                        # (B, d), unit norm
        k = self.keys(x_key, key_emb).to(q.dtype)                            # (B, d), constants
        nce = self.bank.nce(q, k, self.cfg.tau, ids=video_id).mean()
        loss = nce
        terms = {"mcl/nce": nce.detach()}
        if self.cfg.mal_enabled:
            mal, mal_terms, lam = self._mal(q, k, fmap, motion_q, progress)
            if mal is not None:
                loss = loss + lam * mal
                terms.update({"mcl/mal": mal.detach(), "mcl/mal_weight": torch.tensor(float(lam))})
                terms.update({f"mcl/mal_{name}": v for name, v in mal_terms.items()})
        if self.training:                                           # evaluation passes leave the bank alone
            self.bank.enqueue(k, ids=video_id)
        terms["mcl/bank_fill"] = torch.tensor(self.bank.fill)
        return loss, terms

    def _mal(self, q, k, fmap, motion_q, progress):
        c = self.cfg.mal
        if fmap is None or motion_q is None:
            raise ValueError("MCL with MAL needs the query's feature map and motion targets")
        grad = None
        if needs_gradient(c.variant):
            if not (torch.is_grad_enabled() and fmap.requires_grad):
                return None, {}, 0.0                                # evaluation without grad: no MAL
            grad, = torch.autograd.grad((q * k).sum(), fmap, create_graph=True)
            grad = grad[:q.shape[0]]
        pred = response_map(c.variant, fmap[:q.shape[0]], grad, c.channel_weights)
        target = pool_motion(motion_q, tuple(pred.shape[1:]))
        loss, terms = mal_loss(pred, target, st=c.st, s=c.s, t=c.t, time_weighting=c.time_weighting)
        epoch = progress * self.epoch_of_progress
        lam = mal_weight(epoch, weight=c.weight, warmup_weight=c.warmup_weight, warmup_epochs=c.warmup_epochs)
        return loss, terms, lam
