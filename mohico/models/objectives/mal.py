"""MCL's motion alignment loss (MAL, docs/METHODS.md section 1.3).

The network's response map on a late convolution ``A: (B, C, T', H', W')`` should sit where
the motion is. With ``g = d(q . k+) / dA`` (double backprop, ``create_graph=True``, taken by
:class:`mohico.models.objectives.mcl.MCL` inside the module's forward) the response map is one of:

- ``feature_map``           (a): ``sum_c A_c``
- ``weighted_feature_map``  (b): ``ReLU(sum_c w_c A_c)``   (Grad-CAM)
- ``weighted_gradient_map`` (c): ``ReLU(sum_c w_c g_c)``   (the default; best in the paper)

with channel weights ``w_c = mean(g_c)`` over the whole map (``channel_weights="global"``, the
paper) or per time step, ``w_{c,t} = mean_{h,w} g_{c,t}`` (``"per_time"``, the official code's
adaptive pool to ``(T', 1, 1)``).

The motion target ``(B, T, Hm, Wm)`` (already cut to the query's crop by the loader) is pooled
to the response map's ``(T', H', W')`` grid with adaptive average pooling. Similarities are
cosines as in the official code and ``L_MAL = (1 - s_st) + (1 - s_s) + (1 - s_t)`` with each
term switchable:

- ``s_st``: per-time cosine over ``H' x W'``, weighted by a softmax over each time step's total
  (summed) motion. ``time_weighting="normalized"`` (default) divides the totals by their mean
  over the clip first, so the weights do not depend on the motion maps' units (rescaling the maps
  leaves them unchanged; a clip without motion weighs its time steps equally); ``"raw"`` is the
  official code's softmax over the physical totals, whose sharpness depends on those units;
- ``s_s``: cosine of the time-averaged maps (S-motion);
- ``s_t``: cosine of the per-time totals (T-motion curve, length ``T'``).

Each term is averaged over the batch. The weight ``lambda`` is ``warmup_weight`` (2) during the
first ``warmup_epochs`` epochs and ``weight`` (1) after (:func:`mal_weight`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("feature_map", "weighted_feature_map", "weighted_gradient_map")


def needs_gradient(variant: str) -> bool:
    """True for the Grad-CAM style variants, which need ``g = d(q.k+)/dA``."""
    _check_variant(variant)
    return variant != "feature_map"


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"MAL variant must be one of {VARIANTS}, got {variant!r}")


def response_map(variant: str, fmap: torch.Tensor, grad: torch.Tensor | None = None,
                 channel_weights: str = "global") -> torch.Tensor:
    """``fmap, grad: (B, C, T', H', W')`` -> response map ``(B, T', H', W')``."""
    _check_variant(variant)
    if variant == "feature_map":
        return fmap.sum(1)
    if grad is None:
        raise ValueError(f"MAL variant {variant!r} needs the gradient map g = d(q.k+)/dA")
    if channel_weights == "global":
        w = grad.mean(dim=(2, 3, 4), keepdim=True)                  # (B, C, 1, 1, 1)
    elif channel_weights == "per_time":
        w = grad.mean(dim=(3, 4), keepdim=True)                     # (B, C, T', 1, 1)
    else:
        raise ValueError(f"channel_weights must be 'global' or 'per_time', got {channel_weights!r}")
    source = fmap if variant == "weighted_feature_map" else grad
    return F.relu((w * source).sum(1))


def pool_motion(motion: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``motion: (B, T, Hm, Wm)`` -> ``(B, T', H', W')`` by adaptive average pooling."""
    if motion.ndim != 4:
        raise ValueError(f"motion targets must be (B, T, Hm, Wm), got {tuple(motion.shape)}")
    return F.adaptive_avg_pool3d(motion[:, None].float(), tuple(grid))[:, 0]


TIME_WEIGHTINGS = ("normalized", "raw")


def time_weights(target: torch.Tensor, time_weighting: str = "normalized") -> torch.Tensor:
    """``target: (B, T', H', W')`` -> ``(B, T')`` softmax weights of ``s_st`` over each time step's
    total motion; ``normalized``: totals divided by their per-clip mean (scale-free), ``raw``: as is."""
    totals = target.reshape(target.shape[0], target.shape[1], -1).sum(-1)       # (B, T')
    if time_weighting == "normalized":
        mean = totals.mean(1, keepdim=True)
        totals = totals / mean.clamp_min(torch.finfo(totals.dtype).tiny)        # no motion: all 0, uniform
    elif time_weighting != "raw":
        raise ValueError(f"time_weighting must be one of {TIME_WEIGHTINGS}, got {time_weighting!r}")
    return torch.softmax(totals, dim=1)


def alignment_similarities(pred: torch.Tensor, target: torch.Tensor,
                           time_weighting: str = "normalized") -> dict[str, torch.Tensor]:
    """Cosine similarities ``s_st, s_s, s_t``, each ``(B,)``, between ``pred`` and ``target``
    (both ``(B, T', H', W')``); ``time_weighting`` of ``s_st``: :func:`time_weights`."""
    if pred.shape != target.shape:
        raise ValueError(f"response map {tuple(pred.shape)} and motion target {tuple(target.shape)} differ")
    b, t = pred.shape[:2]
    target = target.to(pred.dtype)
    p, m = pred.reshape(b, t, -1), target.reshape(b, t, -1)
    per_time = (F.normalize(p, dim=-1) * F.normalize(m, dim=-1)).sum(-1)      # (B, T')
    s_st = (per_time * time_weights(target, time_weighting)).sum(1)
    s_s = (F.normalize(p.mean(1), dim=-1) * F.normalize(m.mean(1), dim=-1)).sum(-1)
    s_t = (F.normalize(p.sum(-1), dim=-1) * F.normalize(m.sum(-1), dim=-1)).sum(-1)
    return {"st": s_st, "s": s_s, "t": s_t}


def mal_loss(pred: torch.Tensor, target: torch.Tensor, st: bool = True, s: bool = True,
             t: bool = True, time_weighting: str = "normalized") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_MAL`` for response maps ``pred`` and pooled targets ``target`` (``(B, T', H', W')``).

    Returns the scalar loss (enabled terms summed) and every term ``1 - s`` (batch mean),
    enabled or not, for logging (disabled terms are computed without gradient).
    """
    if not (st or s or t):
        raise ValueError("MAL needs at least one of the st, s, t terms")
    sims = alignment_similarities(pred, target, time_weighting)
    enabled = {"st": st, "s": s, "t": t}
    terms = {name: (1.0 - sim).mean() for name, sim in sims.items()}
    loss = sum(terms[name] for name in terms if enabled[name])
    return loss, {name: value.detach() for name, value in terms.items()}


def mal_weight(epoch: float, weight: float = 1.0, warmup_weight: float = 2.0, warmup_epochs: float = 5.0) -> float:
    """``lambda``: ``warmup_weight`` while ``epoch < warmup_epochs``, ``weight`` after."""
    return warmup_weight if epoch < warmup_epochs else weight
