"""mohico.eval.features.precise_bn (PySlowFast's precise BN) against a float64 numpy reference
written from its definition: each BN layer's running mean / variance = the average over the
forward passes of the pass's batch mean / unbiased batch variance, each layer seeing the previous
layers normalised by their own batch statistics (train mode)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mohico.errors import MohicoError
from mohico.eval.features import precise_bn

EPS = 1e-5


def model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.BatchNorm3d(3, eps=EPS), nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4, eps=EPS))
    with torch.no_grad():                       # non-trivial affine of the first BN
        m[0].weight.uniform_(0.5, 2.0)
        m[0].bias.uniform_(-1.0, 1.0)
    return m


def reference(m: nn.Sequential, batches: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(mean, var)]`` of both BN layers, float64, from the definition."""
    w1, b1 = m[0].weight.detach().double().numpy(), m[0].bias.detach().double().numpy()
    wc, bc = m[1].weight.detach().double().numpy()[:, :, 0, 0, 0], m[1].bias.detach().double().numpy()
    stats = [[], []]
    for x in batches:
        x = x.astype(np.float64)                                    # (B, 3, T, H, W)
        axes = (0, 2, 3, 4)
        mu, var = x.mean(axes), x.var(axes)                         # biased: what normalises in train mode
        n = x.size // x.shape[1]
        stats[0].append((mu, var * n / (n - 1)))                    # running_var takes the unbiased one
        y = (x - mu[None, :, None, None, None]) / np.sqrt(var + EPS)[None, :, None, None, None]
        y = y * w1[None, :, None, None, None] + b1[None, :, None, None, None]
        z = np.einsum("oc,bcthw->bothw", wc, y) + bc[None, :, None, None, None]
        mu2, var2 = z.mean(axes), z.var(axes)
        stats[1].append((mu2, var2 * n / (n - 1)))
    return [(np.mean([s[0] for s in layer], 0), np.mean([s[1] for s in layer], 0)) for layer in stats]


def clips(n: int, seed: int = 1) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    return [(g.standard_normal((3, 2, 4, 4)) * 3 + 1.5).astype(np.float32) for _ in range(n)]


def test_statistics_are_the_average_of_the_batch_statistics():
    m = model()
    m[0].momentum, m[2].momentum = 0.1, 0.3
    data = clips(11)                            # batches of 4: 4, 4, then a remainder of 3
    used = precise_bn(m, iter(data), torch.device("cpu"), batch_size=4, max_batches=10)
    assert used == 11
    ref = reference(m, [np.stack(data[0:4]), np.stack(data[4:8]), np.stack(data[8:11])])
    for bn, (mu, var) in zip((m[0], m[2]), ref):
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-5)
    assert not m.training and (m[0].momentum, m[2].momentum) == (0.1, 0.3)     # eval mode, momenta restored


def test_max_batches_caps_the_clips_and_a_lone_remainder_is_left_out():
    m = model()
    data = clips(9)
    assert precise_bn(m, iter(data), torch.device("cpu"), batch_size=4, max_batches=1) == 4
    ref = reference(m, [np.stack(data[0:4])])
    np.testing.assert_allclose(m[2].running_mean.double().numpy(), ref[1][0], rtol=1e-5, atol=1e-5)
    m2 = model()
    assert precise_bn(m2, iter(data), torch.device("cpu"), batch_size=4) == 8     # 4 + 4; clip 9 alone: no variance
    ref = reference(m2, [np.stack(data[0:4]), np.stack(data[4:8])])
    np.testing.assert_allclose(m2[0].running_var.double().numpy(), ref[0][1], rtol=1e-5, atol=1e-5)


def test_no_bn_layer_changes_nothing_and_bad_arguments_are_clear_errors():
    conv = nn.Conv3d(3, 4, 1)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    assert precise_bn(conv, iter(clips(4)), torch.device("cpu")) == 0
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    with pytest.raises(MohicoError, match="batches of >= 2 clips"):
        precise_bn(model(), iter(clips(4)), torch.device("cpu"), batch_size=1)
    with pytest.raises(MohicoError, match="no clips"):
        precise_bn(model(), iter([]), torch.device("cpu"))
