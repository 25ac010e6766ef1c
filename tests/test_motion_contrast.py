"""benchmarks/motion_contrast.py (`motion_diagnostics.py contrast`), the contrastive oracle: NT-Xent
with SupCon's negatives, checked against a float64 numpy loss written from the definition."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _numpy_loss(z: np.ndarray, tau: float, labels: np.ndarray | None) -> float:
    """Mean over rows i of -log(exp(s_ip) / sum_{j in N(i) + p} exp(s_ij)), p = i's pair, N(i) = every
    other row (instance) or every row of another class (labels)."""
    n2 = len(z)
    s = z @ z.T / tau
    out = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        cand = [j for j in range(n2) if j != i and (j == p or labels is None or labels[j] != labels[i])]
        out.append(-(s[i, p] - np.log(np.exp(s[i, cand]).sum())))
    return float(np.mean(out))


def test_the_class_oracle_does_not_use_same_class_clips_as_negatives(benchmark_script):
    """The fault: ``contrast --pos class`` paired clips of two videos of a class but kept the batch's
    other clips of that class among the negatives, so it pushed apart what it pulled together."""
    m = benchmark_script("motion_contrast")
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 2] * 2)           # row i and i + 8: one class
    centres = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    z = F.normalize(centres[labels] + 0.3 * torch.randn(16, 12, generator=gen, dtype=torch.float64), dim=1)
    logits, target = m.nt_xent_logits(z, 0.1, labels)
    assert target.tolist() == [*range(8, 16), *range(8)]
    ref = _numpy_loss(z.numpy(), 0.1, labels.numpy())
    assert abs(F.cross_entropy(logits, target).item() - ref) < 1e-9
    assert _numpy_loss(z.numpy(), 0.1, None) - ref > 0.5     # same-class negatives: the old loss, much higher
    masked = torch.isinf(logits)
    assert masked.sum(1).tolist() == [1 + 2 * int((labels[:8] == labels[i % 8]).sum() - 1) for i in range(16)]
    assert not masked[torch.arange(16), target].any()


def test_instance_pairs_keep_every_other_clip_as_a_negative(benchmark_script):
    m = benchmark_script("motion_contrast")
    z = F.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=1)
    logits, target = m.nt_xent_logits(z, 0.2)
    assert torch.isinf(logits).sum().item() == 8
    assert abs(F.cross_entropy(logits, target).item() - _numpy_loss(z.numpy(), 0.2, None)) < 1e-9
