"""MCL: motion-focused contrastive learning (Li et al., ICCV 2021; docs/METHODS.md sections 1.3-1.5).

Query encoder = the shared backbone + :class:`MCLProjection` (``d -> hidden -> ReLU -> 128``,
L2-normalised). Key encoder = an EMA copy of both (momentum ``objectives.mcl.momentum``, no
gradient): the model's one :class:`mohico.models.key_encoder.KeyEncoder`, owned and updated by
``PretrainModule``, which keeps the EMA copy of :attr:`MCL.key_head` (``proj``) and hands MCL
the keys of view 1. Loss per step::

    L = mean_i NCE(q_i, k+_i, bank; tau = 0.1)  +  lambda * L_MAL

with the NCE against the sharded :class:`mohico.models.bank.MemoryBank` (Eq. 10); the keys
are enqueued *after* the loss (the bank writes out of place, so the loss keeps its keys).

Two variants (``objectives.mcl.variant``):

- ``paper`` (Eq. 9-10): one positive key per query (view 1), one NCE row per query.
- ``official`` (the released code, ``contrast/NCEContrast.py`` and ``train.py``): views
  (query, the query's clip under another crop and augmentation, two clips of the other half of
  the video); three positives per query, each its own NCE row against the same bank (the loss is
  the mean of the 3B rows), all three keys enqueued; plus an *intra-video* NCE through a second
  projection head ``intra`` (and its EMA copy): for each other-clip key, the two-way softmax
  ``[q'.k'_same, q'.k'_other] / tau_intra`` with the same-clip key as the target, so the query
  stays closer to its own clip than to the video's other clips. MAL's gradient is taken of
  ``q . k_same``, as in the released code. (The released code also has a clip-order classifier
  with weight epoch / epochs on UCF101 and 0 on Kinetics; it is not implemented.)

``objectives.mcl.negatives: batch`` replaces the bank and the EMA key encoder by SimCLR's
in-batch NT-Xent: the online encoder embeds both views, each clip's positive is the other view
of its video and its negatives every other clip of the batch (clips of the same video excluded,
``video_id``), at ``tau``. No bank, no key encoder, no EMA update: the label-free floor the motion
benchmark's sanity arm trains, run through the real loader
(``benchmarks/reports/2026-12-06-mcl-positive-pairs.md``).
``L_MAL`` (``mal.py``) compares a Grad-CAM style response map of the backbone's late feature
map with the query's motion target; its gradient ``g = d(q . k+)/dA`` is taken here, inside
the forward, with ``torch.autograd.grad(..., create_graph=True)`` (double backprop must
happen inside the module the DeepSpeed engine wraps: docs/DEPENDENCIES.md, DeepSpeed).

Batch norm (``objectives.mcl.bn``: ``shuffle``, ``sync`` or ``none``): how the EMA backbone
is kept from seeing the query's BN batch; see :mod:`mohico.models.key_encoder`. With MCL on,
MCL's ``bn`` and ``momentum`` drive the shared EMA backbone.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from mohico.config import Config
from mohico.models.bank import MemoryBank
from mohico.models.heads import MCLProjection
from mohico.models.objectives.mal import mal_loss, mal_weight, needs_gradient, pool_motion, response_map

log = logging.getLogger(__name__)
MIN_MAL_CELLS = 9        # a response map of fewer spatial cells (e.g. 2 x 2) cannot say where the motion is


class MCL(nn.Module):
    """The MCL objective around a shared query ``backbone`` (read for its ``out_dim``; neither
    owned nor copied).

    What ``PretrainModule`` computes for it: the online backbone's embedding of view 0 (the
    query, ``online_views``) and, through the shared key encoder, keys of view 1
    (``key_views``) made by the EMA copy of ``key_head`` (``proj``) with :meth:`project_keys`.
    Submodule ``proj`` (query projection); ``bank`` is a plain attribute (per-rank state,
    kept out of ``state_dict()``).
    """

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg.objectives.mcl
        self.official = self.cfg.variant == "official"
        self.in_batch = self.cfg.negatives == "batch"
        self.online_views = (0, 1) if self.in_batch else (0,)       # the query (and its pair, in-batch)
        self.key_views = (1, 2, 3) if self.official else (1,)     # same clip, other half x 2 | the key
        self.epoch_of_progress = cfg.trainer.max_steps / cfg.trainer.steps_per_epoch
        self.proj = MCLProjection(backbone.out_dim, cfg.model.proj_hidden or None, cfg.model.proj_dim)
        if self.official:
            self.intra = MCLProjection(backbone.out_dim, cfg.model.proj_hidden or None, cfg.model.proj_dim)
        self.bank = MemoryBank(cfg.bank.size, cfg.bank.dim) if cfg.keeps_bank("mcl") else None
        self._checked_map = False

    @property
    def needs_features(self) -> bool:
        """Whether the query forward must return the late feature map and motion is needed (MAL on)."""
        return self.cfg.mal_enabled

    @property
    def key_head(self) -> nn.Module:
        """The online module whose EMA copy (in the key encoder) projects the keys: ``proj``
        (``paper``), or ``proj`` and ``intra`` side by side (``official``: :class:`InterIntra`, a
        fresh wrapper of the same two modules, not a submodule)."""
        if self.in_batch:
            return None
        return InterIntra(self.proj, self.intra) if self.official else self.proj

    def needs_keys(self) -> bool:
        """Keys every step (they are the NCE's positives), none with in-batch negatives."""
        return not self.in_batch

    @torch.no_grad()
    def project_keys(self, ema_head: nn.Module, key_emb: torch.Tensor) -> torch.Tensor:
        """Keys: ``ema_head`` (the EMA ``key_head``) over the EMA backbone's embedding
        ``key_emb: (V' * B, D)`` of the key views (view-major): ``(B, proj_dim)`` (``paper``) or
        ``(3B, 2 * proj_dim)`` (``official``: inter keys, then intra keys, per row)."""
        return ema_head(key_emb)

    def forward(self, emb: torch.Tensor, keys: torch.Tensor, fmap: torch.Tensor | None = None,
                motion: torch.Tensor | None = None, progress: float = 0.0,
                video_id: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One MCL step.

        ``emb: (B, 1, D)`` backbone embeddings of the query clips (view 0; ``(B, 2, D)`` views 0 and 1
        with in-batch negatives); ``keys`` the key encoder's keys of the ``key_views``
        (:meth:`project_keys`: ``(B, d)``, or ``(3B, 2d)`` for the official variant; None in-batch);
        ``fmap: (N, C', T', H', W')``
        the late feature map of the backbone batch that produced ``emb``, whose first ``B``
        rows are the query clips' (the batch may hold more views; needed when MAL is on);
        ``motion: (B, V, T, Hm, Wm)`` the views' motion targets (MAL reads view 0);
        ``progress`` in [0, 1] (fraction of ``trainer.max_steps`` done); ``video_id: (B,)``
        int64 (the batch's ``video_id``): bank keys of the query's own video are not its
        negatives, and the enqueued keys carry these ids. Returns the loss (NCE + lambda * MAL)
        and detached terms for logging.
        """
        if emb.ndim != 3 or emb.shape[1] != len(self.online_views):
            raise ValueError(f"MCL takes emb: (B, {len(self.online_views)}, D) (views {self.online_views}); "
                             f"got {tuple(emb.shape)}")
        if self.in_batch:
            return self._in_batch(emb, fmap, motion, progress, video_id)
        q = self.proj(emb[:, 0])                                    # (B, d), unit norm
        if self.official:
            return self._official(emb, q, keys.to(q.dtype), fmap, motion, progress, video_id)
        k = keys.to(q.dtype)                                        # (B, d), constants
        nce = self.bank.nce(q, k, self.cfg.tau, ids=video_id).mean()
        loss = nce
        terms = {"mcl/nce": nce.detach(), **self._similarities(q.detach(), k)}
        return self._finish(loss, terms, q, k, k, fmap, motion, progress, video_id)

    def _official(self, emb, q, keys, fmap, motion, progress, video_id):
        """The released code's loss: ``keys: (3B, 2d)`` (same clip, other clip 1, other clip 2;
        inter | intra per row). Inter: each of the 3 positives against the one bank (its
        log-sum-exp computed once), mean over the 3B rows. Intra: two-way softmax per other clip."""
        b, d = q.shape
        k = keys[:, :d].reshape(3, b, d)                            # inter keys (unit norm)
        k_intra = keys[:, d:].reshape(3, b, d)
        lse = self.bank.logits_lse(q, self.cfg.tau, ids=video_id)  # (B,); -inf for an empty bank
        pos = (q[None] * k).sum(-1) / self.cfg.tau                  # (3, B)
        nce = (torch.logaddexp(pos, lse[None].to(pos.dtype)) - pos).mean()
        qi = self.intra(emb[:, 0])
        li = (qi[None] * k_intra).sum(-1) / self.cfg.tau_intra      # (3, B): same clip, other 1, other 2
        intra = torch.nn.functional.softplus(li[1:] - li[:1]).mean()   # -log softmax([same, other])[same]
        terms = {"mcl/nce": nce.detach(), "mcl/intra": intra.detach(), **self._similarities(q.detach(), k[0])}
        ids = None if video_id is None else video_id.repeat(3)
        return self._finish(nce + intra, terms, q, k[0], k.reshape(3 * b, d), fmap, motion, progress, ids)

    def _in_batch(self, emb, fmap, motion, progress, video_id):
        """SimCLR's NT-Xent over the ``2B`` projected clips of views 0 and 1 (``emb: (B, 2, D)``):
        row ``i``'s positive is its video's other view, its negatives the other ``2B - 2`` clips
        less any other clip of its video (``video_id``); symmetric, mean over the ``2B`` rows."""
        b = emb.shape[0]
        z = self.proj(emb.transpose(0, 1).reshape(2 * b, -1))       # (2B, d): view 0 rows, then view 1
        q, k = z[:b], z[b:]
        target = torch.arange(2 * b, device=z.device).roll(b)
        logits = (z @ z.t() / self.cfg.tau).fill_diagonal_(float("-inf"))
        if video_id is not None:                                   # another clip of the row's video: no negative
            ids = video_id.to(z.device).repeat(2)
            same = ids[:, None] == ids[None, :]
            same[torch.arange(2 * b), target] = False
            logits = logits.masked_fill(same, float("-inf"))
        nce = torch.nn.functional.cross_entropy(logits, target)
        with torch.no_grad():
            off = ~torch.eye(2 * b, dtype=torch.bool, device=z.device)
            off[torch.arange(2 * b), target] = False
            neg = (z @ z.t())[off].mean() if off.any() else z.new_zeros(())
        terms = {"mcl/nce": nce.detach(), "mcl/pos_sim": (q * k).sum(1).mean().detach(), "mcl/neg_sim": neg}
        return self._finish(nce, terms, q, k.detach(), None, fmap, motion, progress, None)

    def _finish(self, loss, terms, q, k_mal, k_enqueue, fmap, motion, progress, enqueue_ids):
        """MAL (its gradient of ``q . k_mal``) added to ``loss``, then the keys ``k_enqueue``
        enqueued with ``enqueue_ids`` in training; returns ``(loss, terms)``."""
        if self.cfg.mal_enabled:
            motion_q = None if motion is None else motion[:, 0]
            mal, mal_terms, lam = self._mal(q, k_mal, fmap, motion_q, progress)
            if mal is not None:
                loss = loss + lam * mal
                terms.update({"mcl/mal": mal.detach(), "mcl/mal_weight": torch.tensor(float(lam))})
                terms.update({f"mcl/mal_{name}": v for name, v in mal_terms.items()})
        if self.bank is not None:
            if self.training:                                       # evaluation passes leave the bank alone
                self.bank.enqueue(k_enqueue, ids=enqueue_ids)
            terms["mcl/bank_fill"] = torch.tensor(self.bank.fill)
        return loss, terms

    def _similarities(self, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """MoCo's health signals (this rank): mean cosine of query and positive key, and of query
        and this rank's filled bank shard (the negatives; own-video entries included; 0 while the
        shard is empty). A collapsing encoder shows ``neg_sim`` rising towards ``pos_sim``."""
        neg = q.new_zeros(())
        if self.bank.filled:
            neg = (q @ self.bank.filled_keys().to(q.dtype).mean(0)).mean()
        return {"mcl/pos_sim": (q * k).sum(1).mean(), "mcl/neg_sim": neg}

    def _check_map(self, thw: tuple[int, ...]) -> None:
        """Warn once when MAL's response map is too coarse to align: at ``data.crop_size=32`` an
        R3D/R(2+1)D late map is 2 x 2 (crop / 16), any non-negative 4-cell map has cosine ~0.9
        with the motion target, and MAL stays flat at ~0.1 whatever the backbone attends to."""
        self._checked_map = True
        least = int(getattr(self.cfg.mal, "min_cells", MIN_MAL_CELLS))
        if thw[-1] * thw[-2] < least:
            log.warning("MCL: the motion alignment loss compares maps of only %s (T', H', W') cells; with "
                        "fewer than %d spatial cells it cannot tell where the motion is (its value stays near 0.1 "
                        "and it barely steers the backbone). Raise data.crop_size (the late map of "
                        "R3D/R(2+1)D-18 is the crop / 16 per side; the papers use 112 -> 7 x 7), or set "
                        "objectives.mcl.mal.min_cells=%d to accept this map.",
                        "x".join(map(str, thw)), least, thw[-1] * thw[-2])

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
        if not self._checked_map:
            self._check_map(tuple(pred.shape[1:]))
        target = pool_motion(motion_q, tuple(pred.shape[1:]))
        loss, terms = mal_loss(pred, target, st=c.st, s=c.s, t=c.t, time_weighting=c.time_weighting)
        epoch = progress * self.epoch_of_progress
        lam = mal_weight(epoch, weight=c.weight, warmup_weight=c.warmup_weight, warmup_epochs=c.warmup_epochs)
        return loss, terms, lam


class InterIntra(nn.Module):
    """The official variant's two projection heads side by side: ``x: (N, D) -> (N, 2 * d)``
    (``proj(x)`` then ``intra(x)``, each L2-normalised); the module the key encoder copies."""

    def __init__(self, proj: nn.Module, intra: nn.Module):
        super().__init__()
        self.proj, self.intra = proj, intra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.proj(x), self.intra(x)], dim=-1)
