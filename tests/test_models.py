"""Backbones (shapes, feature maps, TSM shift, MotionSqueeze) and heads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mohico.errors import ConfigError
from mohico.models.backbones import BACKBONES, build_backbone
from mohico.models.heads import HiCoVisualHead, MCLProjection, PairClassifier, TopicalHead
from mohico.models.motionsqueeze import MotionSqueeze
from mohico.models.tsm import TSMBasicBlock, TSMBottleneck, temporal_shift

ROOT = Path(__file__).resolve().parents[1]

# (2, 3, 8, 64, 64) at width 8: (out_dim, fmap shape)
EXPECTED = {
    "r3d_18": (64, (2, 64, 1, 4, 4)),
    "r2plus1d_18": (64, (2, 64, 1, 4, 4)),
    "s3d": (128, (2, 128, 1, 2, 2)),
    "tsm_resnet18": (64, (2, 64, 8, 2, 2)),
    "tsm_resnet50": (256, (2, 256, 8, 2, 2)),
    "msnet_resnet18": (64, (2, 64, 8, 2, 2)),
    "msnet_resnet50": (256, (2, 256, 8, 2, 2)),
}


def test_every_registered_backbone_is_tested():
    assert set(EXPECTED) == set(BACKBONES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backbone_shapes_and_feature_map(name):
    torch.manual_seed(0)
    net = build_backbone(name, width=8).eval()
    x = torch.randn(2, 3, 8, 64, 64)
    out_dim, fshape = EXPECTED[name]
    assert net.out_dim == out_dim
    emb_plain = net(x)
    emb, fmap = net(x, return_features=True)
    assert emb.shape == (2, out_dim) and tuple(fmap.shape) == fshape
    assert torch.isfinite(emb).all() and torch.isfinite(fmap).all()
    torch.testing.assert_close(emb_plain, emb)
    # The named layer is the one returned.
    assert net.feature_layer in dict(net.named_modules())
    # The map sits before a non-linearity: the gradient of the embedding w.r.t. it varies over
    # positions (a map right before the mean pool would give a flat gradient and a flat MAL map).
    g, = torch.autograd.grad((emb @ torch.randn(out_dim)).sum(), fmap)
    per_position = g[0].flatten(1)  # (C', T'H'W')
    assert per_position.std(dim=1).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_feature_map_supports_mal_double_backprop(name):
    """MAL: g = d(score)/d(fmap) with create_graph=True, a loss on g, backward to the weights (train mode)."""
    torch.manual_seed(0)
    net = build_backbone(name, width=8).train()
    # 16 x 64 x 64 leaves every backbone a map of more than one position: on a 1x1x1 map (S3D at
    # 8 x 32 x 32) the L2-normalised CAM is the constant sign(cam) and its gradient is 0 by construction.
    emb, fmap = net(torch.randn(2, 3, 16, 64, 64), return_features=True)
    assert fmap[0, 0].numel() > 1
    score = (F.normalize(emb, dim=1) * torch.randn(2, net.out_dim)).sum()
    g, = torch.autograd.grad(score, fmap, create_graph=True)
    cam = F.relu((g.mean(dim=(2, 3, 4), keepdim=True) * g).sum(1))   # weighted gradient map
    loss = (F.normalize(cam.flatten(1), dim=1) * torch.rand(2, cam[0].numel())).sum()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(q).all() for q in grads)
    assert sum(q.abs().sum() for q in grads) > 0


def test_standard_tsm_resnet_takes_torchvision_imagenet_layout():
    import torchvision
    for ours, theirs in (("tsm_resnet18", torchvision.models.resnet18), ("tsm_resnet50", torchvision.models.resnet50)):
        with torch.device("meta"):
            state = {k: v for k, v in theirs().state_dict().items() if not k.startswith("fc.")}
            net = build_backbone(ours)
        net.load_state_dict(state, strict=True, assign=True)


def test_width_must_be_a_positive_int():
    for bad in (0, "8", 8.0):
        with pytest.raises(ConfigError, match="width must be a positive integer"):
            build_backbone("r3d_18", width=bad)
    with pytest.raises(ConfigError, match="radius >= 1"):
        build_backbone("msnet_resnet18", width=8, radius=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18", "s3d"])
def test_residual_input_feeds_frame_differences(name):
    """input="residual": the net computes on x[t+1] - x[t] (last difference repeated), i.e. exactly
    what the RGB net computes on those differences; a still clip plus any constant offset (the
    appearance of a static scene) gives the same embedding as a zero clip; same state_dict."""
    from mohico.models.backbones import residual_frames

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 64, 64, dtype=torch.float64)
    ref = np.diff(x.numpy(), axis=2)
    ref = np.concatenate([ref, ref[:, :, -1:]], axis=2)
    np.testing.assert_array_equal(residual_frames(x).numpy(), ref)
    assert not residual_frames(x[:, :, :1]).any()

    rgb = build_backbone(name, width=8).eval()
    res = build_backbone(name, width=8, input="residual").eval()
    assert list(rgb.state_dict()) == list(res.state_dict())
    res.load_state_dict(rgb.state_dict())
    x = x.float()
    emb, fmap = res(x, return_features=True)
    emb_ref, fmap_ref = rgb(residual_frames(x), return_features=True)
    torch.testing.assert_close(emb, emb_ref, rtol=0, atol=0)
    torch.testing.assert_close(fmap, fmap_ref, rtol=0, atol=0)
    still = x[:, :, :1].expand_as(x) + 3.0
    torch.testing.assert_close(res(still), res(torch.zeros_like(x)))
    assert not torch.allclose(res(x), res(still))
    with pytest.raises(ConfigError, match="backbone_options.input.*rgb, residual, rgb\+residual.*'flow'"):
        build_backbone(name, width=8, input="flow")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18", "s3d"])
def test_rgb_plus_residual_input_stacks_both_on_channels(name):
    """input="rgb+residual": the first convolution takes 6 channels, the clip then its residual
    frames; the embedding then depends on a static scene's appearance (unlike "residual")."""
    from mohico.models.backbones import prepare_input, residual_frames

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 64, 64)
    both = prepare_input(x, "rgb+residual")
    assert both.shape == (2, 6, 8, 64, 64)
    torch.testing.assert_close(both[:, :3], x, rtol=0, atol=0)
    torch.testing.assert_close(both[:, 3:], residual_frames(x), rtol=0, atol=0)
    net = build_backbone(name, width=8, input="rgb+residual").eval()
    first = next(p for p in net.parameters() if p.dim() == 5)
    assert first.shape[1] == 6
    emb, fmap = net(x, return_features=True)
    assert emb.shape == (2, net.out_dim) and torch.isfinite(fmap).all()
    still = x[:, :, :1].expand_as(x)
    assert not torch.allclose(net(still), net(still + 3.0))


def test_tiny_cpu_config_backbone_runs():
    net = build_backbone("r3d_18", width=8)
    emb, fmap = net(torch.randn(2, 3, 4, 32, 32), return_features=True)
    assert emb.shape == (2, 64) and fmap.shape == (2, 64, 1, 2, 2)
    emb.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_config_names_and_options_match_the_builders():
    """The bottom-floor table the config validates against lists exactly the registered
    backbones, each with exactly the keyword options its builder takes."""
    import inspect

    from mohico.config_backbones import BACKBONE_OPTIONS

    assert set(BACKBONE_OPTIONS) == set(BACKBONES)
    for name, builder in BACKBONES.items():
        params = inspect.signature(builder).parameters.values()
        takes = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert list(BACKBONE_OPTIONS[name]) == takes, name


def test_registry_errors():
    with pytest.raises(ConfigError) as e:
        build_backbone("r2plus1d18")
    msg = str(e.value)
    assert "did you mean 'r2plus1d_18'" in msg
    assert all(n in msg for n in BACKBONES)
    with pytest.raises(ConfigError, match=r"'depth'.*valid: width"):
        build_backbone("r3d_18", depth=34)
    with pytest.raises(ConfigError, match="radius"):
        build_backbone("msnet_resnet18", radius=7, sigma=5.0, windows=3)


def _shift_reference(x: np.ndarray, t: int) -> np.ndarray:
    """Hand-written TSM shift on (B*T, C, H, W) float64."""
    bt, c = x.shape[:2]
    fold = c // 8
    out = np.zeros_like(x)
    for b in range(bt // t):
        for i in range(t):
            for ch in range(c):
                if ch < fold:
                    src = i + 1
                elif ch < 2 * fold:
                    src = i - 1
                else:
                    src = i
                if 0 <= src < t:
                    out[b * t + i, ch] = x[b * t + src, ch]
    return out


def test_self_gating_is_the_s3dg_definition():
    """``x * sigmoid(W @ mean_{t,h,w}(x) + b)``, per channel, written out in float64."""
    from mohico.models.backbones import SelfGating

    torch.manual_seed(0)
    gate = SelfGating(6).double()
    x = torch.randn(3, 6, 4, 5, 5, dtype=torch.float64)
    w, b = gate.fc.weight, gate.fc.bias
    ref = torch.empty_like(x)
    for n in range(3):
        pooled = x[n].reshape(6, -1).mean(dim=1)
        g = 1.0 / (1.0 + torch.exp(-(w @ pooled + b)))
        for c in range(6):
            ref[n, c] = x[n, c] * g[c]
    torch.testing.assert_close(gate(x), ref, rtol=1e-12, atol=1e-12)


def test_s3d_gating_gates_each_branch_of_every_inception_block():
    """``gating=True`` (S3D-G): an inception block's output is the concatenation of its branches, each
    gated by its own SelfGating; gates that pass everything (W = 0, b = 50: sigmoid = 1 in float64)
    give the ungated net with the same weights; ``bn_momentum`` reaches every BN."""
    from mohico.models.backbones import _branches

    torch.manual_seed(0)
    gated = build_backbone("s3d", width=8, gating=True, bn_momentum=0.1).double().eval()
    plain = build_backbone("s3d", width=8).double().eval()
    assert sorted(gated.gates, key=int) == ["5", "6", "8", "9", "10", "11", "12", "14", "15"] and plain.gates is None
    assert {m.momentum for m in gated.modules() if isinstance(m, torch.nn.BatchNorm3d)} == {0.1}
    assert {m.momentum for m in plain.modules() if isinstance(m, torch.nn.BatchNorm3d)} == {0.001}
    with torch.no_grad():
        for p in gated.gates.parameters():
            p.normal_(0.0, 0.5)
    block, gates = gated.features[8], gated.gates["8"]
    x = torch.randn(2, block.branch0[0].in_channels, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        outs = []
        for branch, g in zip(_branches(block), gates):
            y = branch(x)
            gate = torch.sigmoid(y.mean(dim=(2, 3, 4)) @ g.fc.weight.T + g.fc.bias)
            outs.append(y * gate[:, :, None, None, None])
        torch.testing.assert_close(gated._block(8, x), torch.cat(outs, 1), rtol=1e-12, atol=1e-12)
        clip = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
        plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gates.")})
        emb_g, fmap_g = gated(clip, return_features=True)
        emb_p, fmap_p = plain(clip, return_features=True)
        assert (emb_g - emb_p).abs().max() > 0.1 * emb_p.abs().max() > 0     # the gates act
        for p in gated.gates.parameters():
            p.zero_()
        for g in gated.gates.values():
            for one in g:
                one.fc.bias.fill_(50.0)
        emb_g, fmap_g = gated(clip, return_features=True)
        torch.testing.assert_close(emb_g, emb_p, rtol=0, atol=0)
        torch.testing.assert_close(fmap_g, fmap_p, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="bn_momentum"):
        build_backbone("s3d", width=8, bn_momentum=0.0)
    from mohico.errors import MohicoError
    from mohico.models.export import to_torchvision

    with pytest.raises(MohicoError, match="gating=true .*--format mohico"):
        to_torchvision(build_backbone("s3d", gating=True))


def test_the_hico_config_builds_s3dg():
    from mohico.config import load_config

    cfg = load_config(ROOT / "configs" / "hico_s3d_uk400.yaml")
    assert cfg.model.backbone == "s3d" and cfg.model.backbone_options == {"gating": True, "bn_momentum": 0.1}
    net = build_backbone(cfg.model.backbone, **{**cfg.model.backbone_options, "width": 8})
    assert net.gating and net.bn_momentum == 0.1


def test_temporal_shift_matches_reference():
    x = torch.randn(2 * 5, 16, 3, 4, dtype=torch.float64)
    out = temporal_shift(x, 5)
    np.testing.assert_array_equal(out.numpy(), _shift_reference(x.numpy(), 5))


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_tsm_blocks_shift_only_the_residual_branch():
    torch.manual_seed(0)
    t = 4
    x = torch.randn(2 * t, 16, 6, 6, dtype=torch.float64)
    xs = torch.from_numpy(_shift_reference(x.numpy(), t))

    basic = TSMBasicBlock(16, 16).double().eval()
    _randomise_bn(basic)
    ref = F.relu(_bn(F.conv2d(F.relu(_bn(F.conv2d(xs, basic.conv1.weight, padding=1), basic.bn1)),
                              basic.conv2.weight, padding=1), basic.bn2) + x)
    torch.testing.assert_close(basic(x, t), ref)

    bottleneck = TSMBottleneck(16, 4).double().eval()
    _randomise_bn(bottleneck)
    h = F.relu(_bn(F.conv2d(xs, bottleneck.conv1.weight), bottleneck.bn1))
    h = F.relu(_bn(F.conv2d(h, bottleneck.conv2.weight, padding=1), bottleneck.bn2))
    ref = F.relu(_bn(F.conv2d(h, bottleneck.conv3.weight), bottleneck.bn3) + x)
    torch.testing.assert_close(bottleneck(x, t), ref)


def test_msnet_is_tsm_plus_motion_after_layer2():
    torch.manual_seed(0)
    ms = build_backbone("msnet_resnet18", width=8).eval()
    tsm = build_backbone("tsm_resnet18", width=8).eval()
    state = {k: v for k, v in ms.state_dict().items() if not k.startswith("motion_squeeze.")}
    tsm.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 4, 64, 64)
    assert not torch.allclose(ms(x), tsm(x), atol=1e-4)
    last_bn = ms.motion_squeeze.transform[-1][4]
    assert last_bn.num_features == 16  # layer2's channels at width 8: the module sits after layer2
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    torch.testing.assert_close(ms(x), tsm(x))
    with pytest.raises(ValueError, match="at least 2 frames"):
        ms(torch.randn(1, 3, 1, 64, 64))


def _identity_ms(channels: int) -> MotionSqueeze:
    """The 1x1 conv alone, as the identity: the features reach the correlation unchanged."""
    ms = MotionSqueeze(channels, corr_channels=channels, reduction="conv").double()
    with torch.no_grad():
        ms.reduce.weight.copy_(torch.eye(channels, dtype=torch.float64)[:, :, None, None])
    return ms


@pytest.mark.slow
@pytest.mark.parametrize("dx,dy", [(2, -3), (-5, 1), (0, 4)])
def test_motionsqueeze_recovers_a_known_shift(dx, dy):
    """Frame 2 is frame 1 shifted by (dx, dy) px inside a textured square, noise elsewhere."""
    gen = torch.Generator().manual_seed(1)
    c, h, w = 32, 40, 40
    texture = torch.randn(c, h, w, generator=gen, dtype=torch.float64)
    mask = torch.zeros(h, w, dtype=torch.float64)
    mask[8:32, 8:32] = 1.0  # texture inside, flat (only per-frame noise) outside
    frame1 = texture * mask
    frame2 = torch.roll(frame1, shifts=(dy, dx), dims=(1, 2))
    noise = 0.02 * torch.randn(2, c, h, w, generator=gen, dtype=torch.float64)
    x = torch.stack([frame1, frame2]) + noise
    m = _identity_ms(c).motion(x, num_segments=2)
    assert m.shape == (2, 3, h, w)
    torch.testing.assert_close(m[1], m[0])  # the last frame duplicates the last pair
    # Inside the moved texture (frame 1's square that stays textured in frame 2), away from its borders.
    ys = slice(8 + max(dy, 0) + 1, 32 + min(dy, 0) - 1)
    xs = slice(8 + max(dx, 0) + 1, 32 + min(dx, 0) - 1)
    torch.testing.assert_close(m[0, 0, ys, xs], torch.full_like(m[0, 0, ys, xs], dx / 7), atol=1e-3, rtol=0)
    torch.testing.assert_close(m[0, 1, ys, xs], torch.full_like(m[0, 1, ys, xs], dy / 7), atol=1e-3, rtol=0)
    conf = m[0, 2]
    flat = torch.ones(h, w, dtype=torch.bool)
    flat[1:39, 1:39] = False  # the outer ring: pure noise in both frames, far from the square
    assert conf[ys, xs].min() > 0.99
    assert conf[flat].max() < conf[ys, xs].min() - 0.2


def test_gradients_flow_through_the_soft_argmax():
    torch.manual_seed(0)
    ms = MotionSqueeze(16, corr_channels=8).double()
    x = torch.randn(2 * 3, 16, 12, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 2, 12, 12, dtype=torch.float64)

    def loss_fn():
        return (ms.motion(x, 3)[:, :2] * weights).sum()  # displacement channels only

    loss_fn().backward()
    g = ms.reduce.weight.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Directional finite difference on the 1x1 conv before the correlation.
    v = torch.randn_like(ms.reduce.weight)
    eps = 1e-6
    with torch.no_grad():
        ms.reduce.weight += eps * v
        up = loss_fn()
        ms.reduce.weight -= 2 * eps * v
        down = loss_fn()
        ms.reduce.weight += eps * v
    torch.testing.assert_close((up - down) / (2 * eps), (g * v).sum(), rtol=1e-4, atol=1e-6)
    # And the full MS module, back to its transform and its input.
    ms.zero_grad()
    ms(x.detach(), 3).sum().backward()
    assert ms.reduce.weight.grad.abs().sum() > 0 and ms.transform[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False])
def test_motionsqueeze_channel_reduction_is_the_official_conv_bn_relu(training):
    """Default (arunos728/MotionSqueeze ``chnl_reduction``): ``relu(bn(conv1x1(x)))``, so every
    feature the correlation compares is >= 0; ``reduction="conv"`` keeps the 1x1 conv alone. The
    reference is the definition in float64, BN with the batch's statistics (training) or the
    running ones (eval), against the module's own parameters set away from their defaults."""
    torch.manual_seed(0)
    ms = MotionSqueeze(16, corr_channels=8).double().train(training)
    bn = ms.reduce_norm[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.3)
        bn.running_mean.normal_(0.0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 16, 5, 5, dtype=torch.float64)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    f = torch.einsum("oc,bchw->bohw", ms.reduce.weight[:, :, 0, 0], x)
    if training:
        mean, var = f.mean(dim=(0, 2, 3)), f.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = rm, rv
    ref = torch.clamp((f - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * bn.weight[:, None, None]
                      + bn.bias[:, None, None], min=0.0)
    out = ms.reduced(x)
    assert (out >= 0).all() and (out == 0).any() and (out > 0).any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    plain = MotionSqueeze(16, corr_channels=8, reduction="conv").double()
    plain.reduce.load_state_dict(ms.reduce.state_dict())
    assert plain.reduce_norm is None
    torch.testing.assert_close(plain.reduced(x), f, rtol=1e-10, atol=1e-10)
    assert (plain.reduced(x) < 0).any()
    with pytest.raises(ConfigError, match="'model.backbone_options.reduction'"):
        MotionSqueeze(16, reduction="bn")
    net = build_backbone("msnet_resnet18", width=8, reduction="conv")
    assert net.motion_squeeze.reduction == "conv"
    build_backbone("msnet_resnet18", width=8, reduction="conv").load_state_dict(net.state_dict())
    with pytest.raises(ConfigError, match="reduction=conv"):    # weights of the former default
        build_backbone("msnet_resnet18", width=8).load_state_dict(net.state_dict())
    assert build_backbone("msnet_resnet18", width=8).motion_squeeze.reduction == "conv_bn_relu"


def test_motionsqueeze_adds_about_21k_parameters_at_resnet18():
    tsm, ms = build_backbone("tsm_resnet18"), build_backbone("msnet_resnet18")
    extra = sum(p.numel() for p in ms.parameters()) - sum(p.numel() for p in tsm.parameters())
    assert 20_000 < extra < 22_000


# ----------------------------------------------------------------------------- heads

def test_projection_heads():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    for head in (MCLProjection(32), HiCoVisualHead(32), HiCoVisualHead(32, hidden=48)):
        z = head(x)
        assert z.shape == (6, 128)
        torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    assert MCLProjection(32).net[0].out_features == 32 and MCLProjection(32, 64).net[0].out_features == 64
    visual = HiCoVisualHead(32, hidden=48)
    kinds = [type(m).__name__ for m in visual.net]
    assert kinds.count("Linear") == 3 and kinds.count("BatchNorm1d") == 2
    topical = TopicalHead(32, hidden=48)                 # official: the 3-layer BN MLP to 128, L2-normalised
    assert [type(m).__name__ for m in topical.net] == kinds
    assert [m.out_features for m in topical.net if isinstance(m, torch.nn.Linear)] == [48, 48, 128]
    torch.testing.assert_close(topical(x).norm(dim=1), torch.ones(6))


def test_pair_classifier_scores_all_ordered_pairs():
    torch.manual_seed(0)
    phi = PairClassifier(128, 256)
    z = torch.randn(7, 128)
    m = phi.pairwise(z)
    assert m.shape == (7, 7)
    loop = torch.stack([torch.stack([phi(z[i], z[j]) for j in range(7)]) for i in range(7)])
    torch.testing.assert_close(m, loop, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m, m.t())  # both orders are scored, and they differ
    assert phi.fc1.in_features == 256 and phi.fc2.out_features == 1
    m.sum().backward()
    assert phi.fc1.weight.grad.abs().sum() > 0
