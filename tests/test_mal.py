"""Motion alignment loss: float64 numpy references for the response maps and similarities,
double backprop checked with gradcheck, the gradient reaching the backbone, the weight
schedule, and a tiny model trained on MAL alone aligning its response map with the motion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mohico.config import Config
from mohico.models.backbones import build_backbone
from mohico.models.objectives.mal import (alignment_similarities, mal_loss, mal_weight, pool_motion,
                                          response_map)
from mohico.models.key_encoder import KeyEncoder
from mohico.models.objectives.mcl import MCL


def _np_cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _np_similarities(p, m, time_weighting="normalized"):
    """docs/METHODS.md 1.3, official code form: s_st, s_s, s_t for (B, T, H, W) maps; the s_st softmax
    runs over each time step's total motion divided by the clip's mean total ("normalized") or
    over the raw totals (the official code)."""
    b, t = p.shape[:2]
    p, m = p.reshape(b, t, -1), m.reshape(b, t, -1)
    score = m.sum(-1)
    if time_weighting == "normalized":
        score = score / score.mean(1, keepdims=True)
    att = np.exp(score - score.max(1, keepdims=True))
    att /= att.sum(1, keepdims=True)
    s_st = (_np_cos(p, m) * att).sum(1)
    s_s = _np_cos(p.mean(1), m.mean(1))
    s_t = _np_cos(p.sum(-1), m.sum(-1))
    return s_st, s_s, s_t


def _np_response(variant, a, g, channel_weights):
    if variant == "feature_map":
        return a.sum(1)
    w = g.mean(axis=(2, 3, 4), keepdims=True) if channel_weights == "global" else g.mean(axis=(3, 4), keepdims=True)
    src = a if variant == "weighted_feature_map" else g
    return np.maximum((w * src).sum(1), 0.0)


@pytest.mark.parametrize("variant", ["feature_map", "weighted_feature_map", "weighted_gradient_map"])
@pytest.mark.parametrize("channel_weights", ["global", "per_time"])
def test_response_maps_and_similarities_match_numpy(variant, channel_weights):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 4, 3, 3, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 5, 4, 3, 3, generator=g, dtype=torch.float64)
    pred = response_map(variant, a, grad, channel_weights)
    np.testing.assert_allclose(pred.numpy(), _np_response(variant, a.numpy(), grad.numpy(), channel_weights),
                               rtol=1e-12, atol=1e-14)
    m = torch.rand(3, 4, 3, 3, generator=g, dtype=torch.float64) * 3
    sims = alignment_similarities(pred.abs() + 0.1, m)
    for got, ref in zip((sims["st"], sims["s"], sims["t"]), _np_similarities(pred.abs().numpy() + 0.1, m.numpy())):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    loss, terms = mal_loss(pred.abs() + 0.1, m, st=True, s=False, t=True)
    ref = _np_similarities(pred.abs().numpy() + 0.1, m.numpy())
    assert loss.item() == pytest.approx((1 - ref[0]).mean() + (1 - ref[2]).mean(), rel=1e-12)
    assert terms["s"].item() == pytest.approx((1 - ref[1]).mean(), rel=1e-12)   # logged even when off
    with pytest.raises(ValueError):
        mal_loss(pred, m, st=False, s=False, t=False)
    raw = alignment_similarities(pred.abs() + 0.1, m, time_weighting="raw")
    ref_raw = _np_similarities(pred.abs().numpy() + 0.1, m.numpy(), "raw")
    np.testing.assert_allclose(raw["st"].numpy(), ref_raw[0], rtol=1e-12)


def test_time_weighting_is_invariant_to_rescaling_the_motion_maps():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(4, 4, 7, 7, generator=g, dtype=torch.float64)
    m = torch.rand(4, 4, 7, 7, generator=g, dtype=torch.float64) * torch.tensor([0.2, 1.0, 3.0, 0.5])[:, None, None]
    sims = {c: alignment_similarities(pred, c * m) for c in (1e-3, 1.0, 1e3)}
    for c in (1e-3, 1e3):
        for k in ("st", "s", "t"):
            np.testing.assert_allclose(sims[c][k].numpy(), sims[1.0][k].numpy(), rtol=1e-12, err_msg=f"{k} x{c}")
    np.testing.assert_allclose(sims[1.0]["st"].numpy(), _np_similarities(pred.numpy(), m.numpy())[0], rtol=1e-12)
    # the official raw softmax is not scale-free: its weights turn one-hot / uniform with the units
    raw = {c: alignment_similarities(pred, c * m, time_weighting="raw")["st"] for c in (1e-3, 1e3)}
    assert (raw[1e-3] - raw[1e3]).abs().max() > 1e-3
    zero = alignment_similarities(pred, torch.zeros_like(m))["st"]          # no motion: equal weights, no nan
    assert torch.isfinite(zero).all()
    with pytest.raises(ValueError, match="time_weighting"):
        alignment_similarities(pred, m, time_weighting="softmax")


def test_pool_motion_is_adaptive_average_pooling():
    m = torch.arange(2 * 4 * 6 * 6, dtype=torch.float64).reshape(2, 4, 6, 6)
    out = pool_motion(m, (2, 3, 3))
    ref = m.numpy().reshape(2, 2, 2, 3, 2, 3, 2).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(out.numpy(), ref)


def test_weight_schedule():
    assert mal_weight(0.0) == 2.0 and mal_weight(4.99) == 2.0 and mal_weight(5.0) == 1.0
    assert mal_weight(1.0, weight=0.5, warmup_weight=3.0, warmup_epochs=0.5) == 0.5


def _tiny_mal(w1: torch.Tensor, x, w2, proj, k, target, variant):
    """A 2-conv net as a function of its first weight; MAL through double backprop."""
    a = F.conv3d(F.softplus(F.conv3d(x, w1, padding=(0, 1, 1))), w2)           # late feature map A
    q = F.normalize(F.softplus(a).mean((2, 3, 4)) @ proj, dim=1)
    grad = torch.autograd.grad((q * k).sum(), a, create_graph=True)[0] if variant != "feature_map" else None
    pred = response_map(variant, a, grad)
    return mal_loss(pred, pool_motion(target, tuple(pred.shape[1:])))[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["weighted_feature_map", "weighted_gradient_map"])
def test_double_backprop_gradcheck(variant):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 2, 4, 4, generator=g, dtype=torch.float64)
    w1 = (0.5 * torch.randn(3, 2, 1, 3, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    w2 = torch.randn(4, 3, 1, 1, 1, generator=g, dtype=torch.float64)
    proj = torch.randn(4, 3, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(2, 3, generator=g, dtype=torch.float64), dim=1)
    target = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: _tiny_mal(w, x, w2, proj, k, target, variant), (w1,))


def _mcl_cfg(**mal) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.backbone_options, cfg.model.proj_dim = "r3d_18", {"width": 8}, 16
    cfg.bank.size, cfg.bank.dim = 32, 16
    cfg.objectives.mcl.weight, cfg.objectives.mcl.bn = 1.0, "none"
    cfg.trainer.max_steps, cfg.trainer.steps_per_epoch = 100, 10
    for key, value in mal.items():
        setattr(cfg.objectives.mcl.mal, key, value)
    return cfg


@pytest.mark.parametrize("variant", ["feature_map", "weighted_feature_map", "weighted_gradient_map"])
def test_mal_gradient_reaches_backbone_parameters(variant):
    torch.manual_seed(0)
    cfg = _mcl_cfg(variant=variant)
    backbone = build_backbone("r3d_18", width=8)
    mcl = MCL(cfg, backbone)
    key = KeyEncoder(backbone, {"mcl": mcl.proj}, 0.999, {"mcl": 0.999}, shuffle=False)
    x = torch.randn(2, 3, 8, 32, 32)
    emb, fmap = backbone(x, return_features=True)
    q = mcl.proj(emb)
    k = mcl.project_keys(key.heads["mcl"], key.embed(torch.randn(2, 3, 8, 32, 32)))
    motion = torch.rand(2, 8, 8, 8)
    mal, terms, lam = mcl._mal(q, k, fmap, motion, progress=0.2)          # epoch 2 < 5: warm-up weight
    assert lam == 2.0 and set(terms) == {"st", "s", "t"}
    assert mcl._mal(q, k, fmap, motion, progress=0.6)[2] == 1.0          # epoch 6: weight 1
    mal.backward()
    stem = backbone.stem[0].weight.grad
    assert stem is not None and stem.abs().sum() > 0                    # reaches the first layer
    assert all(p.grad is None for p in key.parameters())
    if variant == "weighted_gradient_map":                                # g depends on the projection
        assert mcl.proj.net[0].weight.grad.abs().sum() > 0


class _Tiny(nn.Module):
    """conv - softplus - conv (A) - softplus - mean - linear. Smooth activations: with ReLUs
    the gradient map is piecewise constant in A and MAL could only reweight channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.proj = nn.Conv3d(3, 8, 3, padding=1), nn.Conv3d(8, 16, 3, padding=1), nn.Linear(16, 8)

    def forward(self, x):
        a = self.c2(F.softplus(self.c1(x)))
        return F.normalize(self.proj(F.softplus(a).mean((2, 3, 4))), dim=1), a


def _moving_squares(b=4, t=2, h=12, seed=1):
    """Clips with a bright 4x4 square moving over noise; the motion target marks the square."""
    g = torch.Generator().manual_seed(seed)
    x, m = 0.1 * torch.randn(b, 3, t, h, h, generator=g), torch.zeros(b, t, h, h)
    for i in range(b):
        y0, x0 = torch.randint(0, h - 5, (2,), generator=g).tolist()
        for f in range(t):
            y, xx = y0 + f % 2, x0 + f // 2
            x[i, :, f, y:y + 4, xx:xx + 4] += 1.0
            m[i, f, y:y + 4, xx:xx + 4] = 1.0
    return x, m


@pytest.mark.slow
@pytest.mark.parametrize("variant,steps,min_corr", [("weighted_gradient_map", 80, 0.95), ("feature_map", 60, 0.8)])
def test_tiny_model_trained_on_mal_aligns_with_motion(variant, steps, min_corr):
    torch.manual_seed(0)
    x, motion = _moving_squares()
    k = F.normalize(torch.randn(4, 8), dim=1)
    net = _Tiny()
    opt = torch.optim.Adam(net.parameters(), 1e-2)

    def corr(pred, target):
        p, t = pred.reshape(4, -1), target.reshape(4, -1)
        return F.cosine_similarity(p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True), dim=1)

    losses = []
    for _ in range(steps):
        q, a = net(x)
        grad = torch.autograd.grad((q * k).sum(), a, create_graph=True)[0] if variant != "feature_map" else None
        pred = response_map(variant, a, grad)
        target = pool_motion(motion, tuple(pred.shape[1:]))
        if not losses:
            start_corr = corr(pred.detach(), target)
        loss, _ = mal_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    end_corr = corr(pred.detach(), target)
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert end_corr.min() > min_corr and end_corr.mean() > start_corr.mean() + 0.3, (start_corr, end_corr)
