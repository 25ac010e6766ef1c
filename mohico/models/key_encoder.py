"""The momentum (EMA) key encoder shared by the objectives, and cross-rank shuffle BN.

:class:`KeyEncoder` holds an EMA copy of the online backbone and, per objective that makes
keys, an EMA copy of that objective's key head (MCL's projection ``proj``, HiCo's visual head
``visual``). ``PretrainModule`` owns the one instance: the EMA backbone runs once per step on
the key view and every objective's keys are its head over that one embedding
(:meth:`KeyEncoder.embed`, then ``objective.project_keys(key_encoder.heads[name], emb)``).
:meth:`KeyEncoder.momentum_update` is the one EMA updater, called after every optimizer step::

    ema = m * ema + (1 - m) * online

with the backbone's ``m`` and each head's own ``m`` (``objectives.<name>.momentum``).

Batch norm of the EMA backbone -- the key encoder must not see the same BN batch as the
query, or the two can "cheat" by matching batch statistics (MoCo section 3.3):

- ``shuffle`` (MoCo's shuffling BN): the key batch is shuffled *across ranks* before the EMA
  backbone and unshuffled after (:func:`shuffled_forward`, two ``all_to_all``), so each
  rank's key BN statistics come from a random subset of the global batch. With one rank the
  shuffle is a permutation inside the batch, which leaves BN statistics unchanged: it is then
  a no-op and gives no protection (use several ranks, or ``bn: sync``).
- ``sync``: the backbone (and so its EMA copy) uses ``SyncBatchNorm``, converted by
  ``PretrainModule`` before the copy is made.
- ``none``: plain per-rank BN, no protection.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from mohico.dist import rank_world
from mohico.errors import MohicoError


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


class KeyEncoder(nn.Module):
    """EMA copies of ``backbone`` and of each objective's key head; no parameter requires grad.

    ``heads``: ``{objective name: online key head}`` (copied here); ``momentum``: the EMA
    backbone's momentum; ``head_momentum``: ``{objective name: momentum}``; ``shuffle``: run the
    EMA backbone with cross-rank shuffle BN. Submodules ``backbone`` and ``heads`` (an
    ``nn.ModuleDict``) are part of ``state_dict()``.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], momentum: float,
                 head_momentum: dict[str, float], shuffle: bool):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.heads = nn.ModuleDict({name: copy.deepcopy(head) for name, head in heads.items()})
        self.momentum, self.head_momentum, self.shuffle = float(momentum), dict(head_momentum), bool(shuffle)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The EMA backbone's embedding ``(B, D)`` of ``x: (B, C, T, H, W)`` (shuffle BN when
        configured; a collective then)."""
        return shuffled_forward(self.backbone, x) if self.shuffle else self.backbone(x)

    @torch.no_grad()
    def momentum_update(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        """``ema = m * ema + (1 - m) * online`` for the backbone copy (``self.momentum``) and each
        head copy (its ``head_momentum``); ``heads``: the online heads by objective name.

        The EMA parameters must be fp32: in bfloat16/float16 an update of ``(1 - m) = 0.001`` of
        the difference rounds away (bf16 keeps ~3 significant digits) and the key encoder would
        silently freeze. Use autocast for mixed precision, not parameters cast to half precision.
        """
        if set(heads) != set(self.heads):
            raise MohicoError(f"KeyEncoder.momentum_update: online heads {sorted(heads)} do not match the EMA heads "
                              f"{sorted(self.heads)}")
        pairs = [(backbone, self.backbone, self.momentum)] + \
            [(heads[name], ema, self.head_momentum[name]) for name, ema in self.heads.items()]
        for _, ema, m in pairs:
            half = {p.dtype for p in ema.parameters()} & {torch.float16, torch.bfloat16}
            if half and m > 0:
                raise MohicoError(f"the EMA key encoder has {sorted(map(str, half))} parameters: momentum {m} updates "
                                  f"would round away. Keep the model in fp32 and use autocast for bf16 "
                                  f"(DeepSpeed 'torch_autocast'), not parameters cast to bf16")
        for online, ema, m in pairs:
            for p_q, p_k in zip(online.parameters(), ema.parameters()):
                p_k.mul_(m).add_(p_q.detach().to(p_k.dtype), alpha=1.0 - m)
