"""HiCo: hierarchical consistency on untrimmed videos (Qing et al., CVPR 2022; methods.md 2.2).

Each video contributes three clips: ``v_i``, ``v_j`` (close in time) and ``v_k`` (anywhere in
the video). Loss = ``visual_weight * L_CL + topical_weight * L_TP``.

**Visual consistency** ``L_CL`` (:func:`visual_consistency`): SimCLR NT-Xent, tau = 0.1, over
the 3N clips of the *global* batch (embeddings all-gathered with gradient:
:class:`AllGatherWithGrad`). Anchors are ``v_i`` and ``v_j`` of this rank's videos; the only
positive of ``v_i`` is ``v_j`` and vice versa. The denominator holds the positive, every clip
of every *other* video (``v_i``, ``v_j``, ``v_k``) and -- in this system -- the memory bank.
``v_k`` is never an anchor and is not a negative of its own video's clips (it is
topically the same video; the official code pairs only ``i``-``j`` for the visual loss): it
enters the visual loss only as a negative of other videos, and the topical loss.

HiCo has no momentum encoder, so its bank holds the detached, projected ``v_j`` embeddings of
past steps (a memory bank in the InstDisc sense), enqueued after the loss; it is a separate
:class:`MemoryBank` from MCL's (the two live in different embedding spaces), sharded the same
way. ``objectives.hico.use_bank=false`` (or ``bank.size=0``) turns it off.

**Topical consistency** ``L_TP`` (:func:`topical_consistency`): a separate projection
(:class:`TopicalHead`), the pair classifier ``phi`` over every ordered pair ``(a, b), a != b``
of this rank's 3B clips (both orders; self-pairs excluded), label 1 for clips of the same
video, and the focal loss with gamma = 0.5, positives and negatives averaged separately::

    L_TP = -mean_pos[(1 - p)^gamma log p] - mean_neg[p^gamma log(1 - p)]

The pairs are formed within each rank's batch (memory O((3B)^2 x 256) per rank, constant in W);
every rank has the same numbers of positive and negative pairs, so the average of the ranks'
losses equals the loss over all their pairs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mohico.config import Config
from mohico.models.bank import MemoryBank, all_gather_nograd, dist_info
from mohico.models.heads import HiCoVisualHead, PairClassifier, TopicalHead


class AllGatherWithGrad(torch.autograd.Function):
    """``x: (n, ...)`` -> ``(n * W, ...)`` from every rank, differentiable: the backward sums the
    gradient of every rank's loss w.r.t. this rank's rows (all-reduce) and returns its slice.
    With DeepSpeed/DDP averaging gradients over ranks, this gives the exact gradient of the
    mean of the ranks' losses. Identity with one rank."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.rank, world = dist_info(group)
        ctx.group, ctx.n = group, x.shape[0]
        return all_gather_nograd(x.contiguous(), group).clone() if world > 1 else x.clone()

    @staticmethod
    def backward(ctx, grad):
        _, world = dist_info(ctx.group)
        grad = grad.contiguous().clone()
        if world > 1:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def visual_consistency(z: torch.Tensor, tau: float, bank: MemoryBank | None = None, group=None) -> torch.Tensor:
    """NT-Xent with HiCo's positive structure; ``z: (B, 3, d)`` L2-normalised (views i, j, k)
    of this rank's videos -> per-anchor loss ``(2B,)`` (anchors: all ``v_i`` then all ``v_j``).

    Candidates: the global batch ``(W*B*3, d)`` minus the anchor's own video, plus its positive,
    plus the bank (if given). A collective when distributed.
    """
    b, v, d = z.shape
    if v != 3:
        raise ValueError(f"HiCo's visual consistency takes z: (B, 3, d) (views i, j, k); got {tuple(z.shape)}")
    rank, _ = dist_info(group)
    everything = AllGatherWithGrad.apply(z.reshape(b * 3, d), group)          # (W*B*3, d), video-major
    anchors = torch.cat([z[:, 0], z[:, 1]], 0)                                # (2B, d)
    positives = torch.cat([z[:, 1], z[:, 0]], 0)
    logits = anchors @ everything.t() / tau                                   # (2B, W*B*3)
    video_of_col = torch.arange(everything.shape[0], device=z.device) // 3
    video_of_anchor = (rank * b + torch.arange(b, device=z.device)).repeat(2)
    own_video = video_of_col[None, :] == video_of_anchor[:, None]
    logits = logits.masked_fill(own_video, float("-inf"))                     # own clips out (incl. self, v_k)
    pos = (anchors * positives).sum(-1) / tau
    parts = [logits, pos[:, None]]
    if bank is not None:
        parts.append(bank.logits_lse(anchors, tau)[:, None].to(logits.dtype))
    return torch.logsumexp(torch.cat(parts, 1), dim=1) - pos


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """Binary focal loss with positives and negatives averaged separately (HiCo's L_TP).

    ``logits, labels`` of the same shape (labels 0/1; entries to ignore removed beforehand).
    ``-mean_pos[(1-p)^gamma log p] - mean_neg[p^gamma log(1-p)]``, ``p = sigmoid(logits)``;
    an empty class contributes 0.
    """
    labels = labels.to(torch.bool)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos_terms = -torch.exp(gamma * log_not_p) * log_p            # (1-p)^gamma * -log p
    neg_terms = -torch.exp(gamma * log_p) * log_not_p            # p^gamma * -log(1-p)
    zero = logits.sum() * 0.0
    pos = pos_terms[labels].mean() if labels.any() else zero
    neg = neg_terms[~labels].mean() if (~labels).any() else zero
    return pos + neg


def topical_consistency(t: torch.Tensor, classifier: PairClassifier, video: torch.Tensor,
                        gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``t: (N, dim)`` topical embeddings, ``video: (N,)`` video index of each clip ->
    (focal loss over every ordered pair a != b, pair accuracy)."""
    scores = classifier.pairwise(t)                                           # (N, N), both orders
    n = t.shape[0]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=t.device)
    same = video[:, None] == video[None, :]
    logits, labels = scores[off_diag], same[off_diag]
    acc = ((logits > 0) == labels).float().mean()
    return focal_loss(logits, labels, gamma), acc.detach()


class HiCo(nn.Module):
    """The HiCo objective on backbone embeddings of the three views (the backbone is shared,
    not owned). Submodules: ``visual`` (HiCoVisualHead), ``topical`` (TopicalHead),
    ``classifier`` (PairClassifier); ``bank`` is a plain attribute (per-rank state)."""

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg.objectives.hico
        d_in, d = backbone.out_dim, cfg.model.proj_dim
        self.visual = HiCoVisualHead(d_in, self.cfg.visual_hidden or None, d)
        self.topical = TopicalHead(d_in, d)
        self.classifier = PairClassifier(d, 256)
        use_bank = self.cfg.use_bank and cfg.bank.size > 0
        self.bank = MemoryBank(cfg.bank.size, cfg.bank.dim) if use_bank else None

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``emb: (B, 3, D)`` backbone embeddings of views i, j, k -> (loss, detached terms)."""
        b, v, d_in = emb.shape
        if v != 3:
            raise ValueError(f"HiCo needs 3 views per video (v_i, v_j, v_k); got {v}")
        flat = emb.reshape(b * 3, d_in)
        z = self.visual(flat).reshape(b, 3, -1)
        visual = visual_consistency(z, self.cfg.tau, self.bank).mean()
        video = torch.arange(b, device=emb.device).repeat_interleave(3)
        topical, acc = topical_consistency(self.topical(flat), self.classifier, video, self.cfg.focal_gamma)
        loss = self.cfg.visual_weight * visual + self.cfg.topical_weight * topical
        terms = {"hico/visual": visual.detach(), "hico/topical": topical.detach(), "hico/topical_acc": acc}
        if self.bank is not None:
            if self.training:                                       # evaluation passes leave the bank alone
                self.bank.enqueue(z[:, 1].detach())
            terms["hico/bank_fill"] = torch.tensor(self.bank.fill)
        return loss, terms
