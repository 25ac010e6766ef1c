"""Projection heads for MCL and HiCo (docs/METHODS.md sections 1.4, 2.2 and 2.3).

- ``MCLProjection``: ``d -> hidden -> ReLU -> 128``, L2-normalised (MoCo-v2 style MLP).
- ``HiCoVisualHead``: ``d -> h (BN, ReLU) -> h (BN, ReLU) -> 128``, L2-normalised (the visual
  consistency MLP; official 1024-1024-1024-128).
- ``TopicalHead``: the topical consistency branch's own projection, the same official 3-layer
  MLP with BN (``d -> h -> h -> 128``), L2-normalised; the pair classifier reads its outputs.
- ``PairClassifier``: ``Linear(2*128, 256) - ReLU - Linear(256, 1)`` on concatenated pairs;
  ``pairwise(z)`` scores every ordered pair of a set at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MCLProjection(nn.Module):
    """``x: (N, d)`` -> ``(N, out_dim)`` unit vectors. ``hidden`` defaults to ``d``."""

    def __init__(self, in_dim: int, hidden: int | None = None, out_dim: int = 128):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class HiCoVisualHead(nn.Module):
    """``x: (N, d)`` -> ``(N, out_dim)`` unit vectors; three linear layers, BN + ReLU after the first two.

    ``hidden`` defaults to ``d``. The linears before a BN have no bias (BN's shift replaces it).
    BN needs ``N > 1`` in training mode.
    """

    def __init__(self, in_dim: int, hidden: int | None = None, out_dim: int = 128):
        super().__init__()
        hidden = hidden or in_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class TopicalHead(HiCoVisualHead):
    """``x: (N, d)`` -> ``(N, out_dim)`` unit vectors: the topical branch's own projection, a separate
    instance of the visual head's architecture (official HiCo: 3 linear layers, BN + ReLU after the
    first two, to 128, L2-normalised). ``hidden`` defaults to ``d``."""


class PairClassifier(nn.Module):
    """phi: ``Linear(2*dim, hidden) - ReLU - Linear(hidden, 1)`` on concatenated pairs ``[a, b]``.

    ``forward(a, b)``: ``a, b: (..., dim)`` -> logits ``(...)``.
    ``pairwise(z)``: ``z: (N, dim)`` -> ``M: (N, N)`` with ``M[i, j] = phi([z_i, z_j])`` — every
    ordered pair, so each unordered pair is scored in both orders. The first layer is split as
    ``W [a; b] = W_a a + W_b b``: ``O(N * hidden)`` for the projections, then an ``(N, N, hidden)``
    hidden activation (no ``(N, N, 2*dim)`` concatenation, no Python loop).
    """

    def __init__(self, dim: int = 128, hidden: int = 256):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.cat([a, b], dim=-1)))).squeeze(-1)

    def pairwise(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"pairwise takes z: (N, {self.dim}); got {tuple(z.shape)}")
        w_a, w_b = self.fc1.weight[:, :self.dim], self.fc1.weight[:, self.dim:]
        left = z @ w_a.t() + self.fc1.bias        # (N, hidden): the first element's part
        right = z @ w_b.t()                       # (N, hidden): the second element's part
        h = F.relu(left[:, None, :] + right[None, :, :])       # (N, N, hidden)
        return (h @ self.fc2.weight[0]) + self.fc2.bias[0]     # (N, N)
