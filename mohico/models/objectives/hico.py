"""HiCo: hierarchical consistency on untrimmed videos (Qing et al., CVPR 2022; docs/METHODS.md 2.2-2.3).

Each video contributes three clips: ``v_i``, ``v_j`` (close in time) and ``v_k`` (anywhere in
the video). Loss = ``visual_weight * L_CL + topical_weight * L_TP``.

**Visual consistency** ``L_CL`` (:func:`visual_consistency`): SimCLR NT-Xent, tau = 0.1, over
the 3N clips of the *global* batch (embeddings all-gathered with gradient:
:class:`AllGatherWithGrad`). Anchors are ``v_i`` and ``v_j`` of this rank's videos; the only
positive of ``v_i`` is ``v_j`` and vice versa. The denominator holds the positive, every clip
of every *other* video (``v_i``, ``v_j``, ``v_k``) and -- in this system -- the memory bank.
``v_k`` is never an anchor and is not a negative of its own video's clips (it is
topically the same video; the official code pairs only ``i``-``j`` for the visual loss): it
enters the visual loss only as a negative of other videos, and the topical loss. With the
batch's ``video_id`` (every training step), "own video" means the same id: clips of a video
sampled twice in the global batch, and bank keys of the anchor's video, are not negatives.

The bank's keys come from a momentum (EMA) key encoder, as in MoCo: the EMA visual head
(the copy of :attr:`HiCo.key_head`, ``visual``; momentum ``objectives.hico.momentum``) over the
EMA backbone's embedding of ``v_j``, computed without gradient and enqueued after the loss. (A
queue of the online head's own past outputs collapsed the visual head: pushing every clip away
from the fast-moving queue together beat the NT-Xent, and the loss rose to ln(#candidates).)
Both EMA copies live in the model's one :class:`mohico.models.key_encoder.KeyEncoder`, owned
by ``PretrainModule`` and shared with MCL (``v_j`` is MCL's key view, so with MCL on the EMA
backbone runs once for both, with MCL's momentum and ``bn``; with HiCo alone, HiCo's
``objectives.hico.momentum`` and ``bn``). The EMA head's BN runs over the key embeddings of the
whole global batch (all-gathered; a single key uses its running statistics:
:meth:`HiCo.project_keys`). It is a separate :class:`MemoryBank` from MCL's (the two live in
different embedding spaces), sharded the same way. ``objectives.hico.use_bank=false`` (or
``bank.size=0``) turns it off, and with it HiCo's keys.

**Topical consistency** ``L_TP`` (:func:`topical_consistency`): a separate projection
(:class:`TopicalHead`, the official 3-layer MLP with BN to 128, L2-normalised), the pair classifier ``phi`` over every ordered pair ``(a, b), a != b``
of this rank's 3B clips (both orders; self-pairs excluded), label 1 for clips of the same
video (same ``video_id``: a video sampled twice gives positive pairs across its samples), and the focal loss with gamma = 0.5, positives and negatives averaged separately::

    L_TP = -mean_pos[(1 - p)^gamma log p] - mean_neg[p^gamma log(1 - p)]

The pairs are formed within each rank's batch (memory O((3B)^2 x 256) per rank, constant in W);
every rank has the same numbers of positive and negative pairs, so the average of the ranks'
losses equals the loss over all their pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohico.config import Config
from mohico.dist import all_gather_cat, all_reduce_, rank_world
from mohico.errors import MohicoError
from mohico.models.bank import MemoryBank
from mohico.models.heads import HiCoVisualHead, PairClassifier, TopicalHead


class AllGatherWithGrad(torch.autograd.Function):
    """``x: (n, ...)`` -> ``(n * W, ...)`` from every rank, differentiable: the backward sums the
    gradient of every rank's loss w.r.t. this rank's rows (all-reduce) and returns its slice.
    With DeepSpeed/DDP averaging gradients over ranks, this gives the exact gradient of the
    mean of the ranks' losses. Identity with one rank."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.rank, world = rank_world(group)
        ctx.group, ctx.n = group, x.shape[0]
        return all_gather_cat(x.contiguous(), group).clone() if world > 1 else x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_(grad.contiguous().clone(), "sum", ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def visual_consistency(z: torch.Tensor, tau: float, bank: MemoryBank | None = None, group=None,
                       video_id: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent with HiCo's positive structure; ``z: (B, 3, d)`` L2-normalised (views i, j, k)
    of this rank's videos -> per-anchor loss ``(2B,)`` (anchors: all ``v_i`` then all ``v_j``).

    Candidates: the global batch ``(W*B*3, d)`` minus the anchor's own video, plus its positive,
    plus the bank (if given). ``video_id: (B,)`` int64: "own video" also covers other samples
    of the same video in the global batch and the bank's keys of that video. A collective when
    distributed (every rank with ids, or none).
    """
    b, v, d = z.shape
    if v != 3:
        raise ValueError(f"HiCo's visual consistency takes z: (B, 3, d) (views i, j, k); got {tuple(z.shape)}")
    rank, _ = rank_world(group)
    everything = AllGatherWithGrad.apply(z.reshape(b * 3, d), group)          # (W*B*3, d), video-major
    anchors = torch.cat([z[:, 0], z[:, 1]], 0)                                # (2B, d)
    positives = torch.cat([z[:, 1], z[:, 0]], 0)
    logits = anchors @ everything.t() / tau                                   # (2B, W*B*3)
    video_of_col = torch.arange(everything.shape[0], device=z.device) // 3
    video_of_anchor = (rank * b + torch.arange(b, device=z.device)).repeat(2)
    own_video = video_of_col[None, :] == video_of_anchor[:, None]
    anchor_ids = None
    if video_id is not None:
        if video_id.shape != (b,) or video_id.dtype != torch.int64:
            raise MohicoError(f"HiCo: video_id must be int64 ({b},) (batch.video_id); got "
                              f"{video_id.dtype} {tuple(video_id.shape)}")
        video_id = video_id.to(z.device)
        id_of_col = all_gather_cat(video_id, group).repeat_interleave(3)      # (W*B*3,)
        anchor_ids = video_id.repeat(2)                                         # (2B,)
        own_video = own_video | (id_of_col[None, :] == anchor_ids[:, None])     # duplicates of the video
    logits = logits.masked_fill(own_video, float("-inf"))                     # own clips out (incl. self, v_k)
    pos = (anchors * positives).sum(-1) / tau
    parts = [logits, pos[:, None]]
    if bank is not None:
        parts.append(bank.logits_lse(anchors, tau, ids=anchor_ids)[:, None].to(logits.dtype))
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
    ``classifier`` (PairClassifier). ``bank`` is a plain attribute (per-rank state), None
    without the bank.

    What ``PretrainModule`` computes for it: the online backbone's embeddings of views 0, 1, 2
    (``online_views``: v_i, v_j, v_k) and, with the bank in training mode, keys of ``v_j``
    (``key_views``) made by the key encoder's EMA copy of ``key_head`` (``visual``)."""

    online_views = (0, 1, 2)
    key_views = (1,)
    needs_features = False

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg.objectives.hico
        d_in, d = backbone.out_dim, cfg.model.proj_dim
        self.visual = HiCoVisualHead(d_in, self.cfg.visual_hidden or None, d)
        self.topical = TopicalHead(d_in, self.cfg.visual_hidden or None, d)
        self.classifier = PairClassifier(d, 256)
        self.bank = MemoryBank(cfg.bank.size, cfg.bank.dim) if cfg.keeps_bank("hico") else None

    @property
    def key_head(self) -> nn.Module | None:
        """The online module whose EMA copy projects the bank keys: ``visual`` (None without the bank)."""
        return self.visual if self.bank is not None else None

    def needs_keys(self) -> bool:
        """Keys only to enqueue: with the bank, in training mode."""
        return self.bank is not None and self.training

    @torch.no_grad()
    def project_keys(self, ema_head: nn.Module, key_emb: torch.Tensor) -> torch.Tensor:
        """Bank keys ``(B, proj_dim)`` of this rank's ``v_j``: ``ema_head`` (the EMA ``visual``)
        over the EMA backbone's embedding ``key_emb: (B, D)``, its BN statistics over the global
        key batch (all-gathered; one key alone uses the running statistics). A collective when
        distributed."""
        rank, _ = rank_world()
        b = key_emb.shape[0]
        everything = all_gather_cat(key_emb.contiguous())           # BN statistics over the global key batch
        training = ema_head.training
        if everything.shape[0] == 1:
            ema_head.eval()                                             # BN cannot normalise one sample
        try:
            return ema_head(everything)[rank * b:(rank + 1) * b]
        finally:
            ema_head.train(training)

    def forward(self, emb: torch.Tensor, keys: torch.Tensor | None = None, fmap: torch.Tensor | None = None,
                motion: torch.Tensor | None = None, progress: float = 0.0,
                video_id: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``emb: (B, 3, D)`` backbone embeddings of views i, j, k -> (loss, detached terms).
        ``keys: (B, d)``: the key encoder's bank keys of ``v_j`` (:meth:`project_keys`), needed
        with the bank in training mode (:meth:`needs_keys`) to enqueue. ``fmap``, ``motion``,
        ``progress``: unused (the objectives' common signature). ``video_id: (B,)`` int64 (the
        batch's ``video_id``): same-video clips are not negatives, topical pairs are labelled
        by video id, and the enqueued keys carry the ids."""
        b, v, d_in = emb.shape
        if v != 3:
            raise ValueError(f"HiCo needs 3 views per video (v_i, v_j, v_k); got {v}")
        flat = emb.reshape(b * 3, d_in)
        z = self.visual(flat).reshape(b, 3, -1)
        visual = visual_consistency(z, self.cfg.tau, self.bank, video_id=video_id).mean()
        video = (torch.arange(b, device=emb.device) if video_id is None else video_id.to(emb.device))
        video = video.repeat_interleave(3)
        topical, acc = topical_consistency(self.topical(flat), self.classifier, video, self.cfg.focal_gamma)
        loss = self.cfg.visual_weight * visual + self.cfg.topical_weight * topical
        terms = {"hico/visual": visual.detach(), "hico/topical": topical.detach(), "hico/topical_acc": acc}
        if self.bank is not None:
            if self.needs_keys():                                   # evaluation passes leave the bank alone
                if keys is None:
                    raise MohicoError("HiCo's bank needs the key encoder's keys of v_j in training mode "
                                      "(PretrainModule computes them: HiCo.needs_keys)")
                self.bank.enqueue(keys, ids=video_id)
            terms["hico/bank_fill"] = torch.tensor(self.bank.fill)
        return loss, terms
