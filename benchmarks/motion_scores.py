"""The motion benchmark diagnostics' scores of fixed features: the ablation's kNN and a nearest class
centroid. ``motion_diagnostics.py`` and its contrast diagnostic (``motion_contrast.py``) both score
with it; it imports neither."""
from __future__ import annotations

import numpy as np
import torch


def knn_and_centroid(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, classes: int) -> tuple:
    """Top-1 of the ablation's kNN (cosine, k=20, T=0.07) and of a nearest class centroid (L2).
    ``train: (N, D)``, ``ytr: (N,)`` class indices, ``test: (M, D)``, ``yte: (M,)`` -> ``(knn, centroid)``."""
    from mohico.eval.knn import knn_scores

    s = knn_scores(torch.from_numpy(train).float(), torch.from_numpy(ytr), torch.from_numpy(test).float(), classes)
    knn = float((s.argmax(1).numpy() == yte).mean())
    cen = np.stack([train[ytr == c].mean(0) for c in range(classes)])
    pred = ((test[:, None] - cen[None]) ** 2).sum(-1).argmin(1)
    return knn, float((pred == yte).mean())
