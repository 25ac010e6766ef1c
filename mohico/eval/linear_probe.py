"""A linear classifier on frozen features (the linear-probe protocol's math).

``fit_linear`` trains ``logits = z @ W.T + b`` on standardised features ``z = (x - mean) / std``
(train statistics, ``std = sqrt(var + 1e-6)``) by mini-batch SGD on the mean cross-entropy:
zero init, momentum ``m`` (PyTorch's convention ``v <- m v + g``, ``p <- p - lr_t v``), weight
decay ``wd * W`` added to W's gradient (not the bias's), cosine learning rate
``lr_t = lr * (1 + cos(pi t / total_steps)) / 2``, one ``torch.randperm`` (seeded) per epoch. The
gradients are the closed form ``dW = (softmax - onehot).T @ z / B``, so a float64 numpy loop is an
exact second implementation.

``video_probabilities`` averages the softmax of every view (temporal clip x spatial crop) of a
video: the multi-clip test accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mohico.errors import MohicoError

STD_EPS = 1e-6


@dataclass
class LinearProbe:
    """``mean, std: (D,)``, ``weight: (K, D)``, ``bias: (K,)`` float32 CPU tensors."""
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x) -> torch.Tensor:
        """``x: (N, D)`` raw features -> ``(N, K)``."""
        x = torch.as_tensor(x, dtype=torch.float32)
        return ((x - self.mean) / self.std) @ self.weight.t() + self.bias


def fit_linear(x, y, num_classes: int, lr: float, weight_decay: float, epochs: int = 100, batch_size: int = 256,
               momentum: float = 0.9, seed: int = 0, device: str | torch.device = "cpu") -> LinearProbe:
    """Train the probe on ``x: (N, D)`` with labels ``y: (N,)`` in ``[0, num_classes)`` (module docstring)."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise MohicoError(f"linear probe: features (N, D) and labels (N,), N > 0; got {tuple(x.shape)}, {tuple(y.shape)}")
    if lr <= 0 or weight_decay < 0 or epochs < 1 or batch_size < 1 or not 0 <= momentum < 1:
        raise MohicoError(f"linear probe: lr > 0, weight_decay >= 0, epochs >= 1, batch_size >= 1, 0 <= momentum < 1; "
                          f"got lr={lr}, weight_decay={weight_decay}, epochs={epochs}, batch_size={batch_size}, "
                          f"momentum={momentum}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise MohicoError(f"linear probe: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    device = torch.device(device)
    x64 = x.double()
    mean = x64.mean(dim=0)
    std = (x64.var(dim=0, unbiased=False) + STD_EPS).sqrt()
    z = ((x64 - mean) / std).float().to(device)
    y = y.to(device)
    n, d = z.shape
    w = torch.zeros(num_classes, d, device=device)
    b = torch.zeros(num_classes, device=device)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    steps = math.ceil(n / batch_size)
    total, t = epochs * steps, 0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            zb = z[idx]
            p = torch.softmax(zb @ w.t() + b, dim=1)
            p[torch.arange(len(idx), device=device), y[idx]] -= 1.0
            g = p / len(idx)
            gw = g.t() @ zb + weight_decay * w
            gb = g.sum(dim=0)
            lr_t = lr * 0.5 * (1.0 + math.cos(math.pi * t / total))
            vw.mul_(momentum).add_(gw)
            vb.mul_(momentum).add_(gb)
            w.sub_(lr_t * vw)
            b.sub_(lr_t * vb)
            t += 1
    if not bool(torch.isfinite(w).all()):
        raise MohicoError(f"linear probe diverged at lr={lr} (non-finite weights); use a smaller learning rate")
    return LinearProbe(mean.float(), std.float(), w.cpu(), b.cpu())


def video_probabilities(probe: LinearProbe, feats: np.ndarray) -> torch.Tensor:
    """``feats: (V, C, D)`` views per video -> ``(V, K)`` mean softmax over the ``C`` views."""
    v, c, d = feats.shape
    p = torch.softmax(probe.logits(feats.reshape(v * c, d)), dim=1)
    return p.reshape(v, c, -1).mean(dim=1)


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index ``(N,)`` in ``[0, folds)`` of each video: every class's videos, in a seeded random
    order, are dealt round the folds in turn (a class of ``n`` videos puts ``n // folds`` or one
    more in each fold), continuing where the previous class stopped, so the fold sizes differ by at
    most one and no fold is empty when ``N >= folds``."""
    labels = np.asarray(labels)
    if folds < 2 or folds > len(labels):
        raise MohicoError(f"linear probe: {folds} folds need 2 <= folds <= the {len(labels)} train videos; "
                          "give fewer folds (--folds, 1: one held-out part) or a single --lr/--wd")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    fold = np.empty(len(labels), dtype=np.int64)
    fold[order] = np.arange(len(order)) % folds
    return fold


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Bool mask ``(N,)`` of a held-out ``fraction`` of each class (rounded, at least one video of a
    class with two or more, never all of a class); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        m = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        held[rng.permutation(idx)[:m]] = True
    return held
