"""MotionSqueeze (Kwon et al., ECCV 2020) and MSNet, the TSM ResNet that carries it (docs/METHODS.md section 3).

The MS module turns the appearance features of consecutive frames into motion features:

1. ``reduce``: a 1x1 conv to ``corr_channels`` (64), BN and ReLU (``reduction="conv_bn_relu"``, the
   official ``chnl_reduction`` of arunos728/MotionSqueeze ``resnet_TSM.py``: the features the
   correlation compares are >= 0), then L2 normalisation over channels. ``reduction="conv"``: the
   1x1 conv alone (mohico before it followed the official code; signed features).
2. ``estimate_motion``: local correlation over a ``(2*radius+1)^2`` window (15x15) between frames
   ``t`` and ``t+1``, Gaussian-masked soft-argmax displacement divided by ``radius`` (so in
   [-1, 1]) and the max correlation as confidence -> 3 channels ``(dx, dy, conf)``; the last
   frame's motion is duplicated so ``T - 1`` pairs give ``T`` frames. The correlation itself is
   ``mohico.kernels.local_correlation_softargmax`` (fused kernel on GPU, PyTorch elsewhere).
3. ``transform``: four depthwise-separable conv blocks (each dw conv, BN, ReLU, pw conv, BN,
   ReLU): dw 7x7 + pw 3->16, dw 3x3 + pw 16->32, dw 3x3 + pw 32->64, dw 3x3 + pw 64->C.
4. The result is added to the appearance feature.

MSNet is a TSM ResNet with the MS module after ``layer2`` (the paper's res3), before ``layer3``.
At ResNet-18 the module has ~21K parameters, as the paper says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mohico.errors import ConfigError
from mohico.kernels import local_correlation_softargmax
from mohico.models.tsm import TSMBasicBlock, TSMBottleneck, TSMResNet


REDUCTIONS = ("conv_bn_relu", "conv")


def _separable(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """Depthwise ``kernel x kernel`` conv, BN, ReLU, pointwise ``cin -> cout`` conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MotionSqueeze(nn.Module):
    """``forward(x: (B*T, C, H, W), num_segments=T) -> (B*T, C, H, W)``: ``x`` + motion features.

    ``corr_channels``: channels of the correlation features; ``radius``: max displacement (the
    window is ``2*radius+1`` square); ``sigma``: Gaussian mask width in displacement units;
    ``temperature``: soft-argmax temperature; ``impl``: kernel implementation (None = dispatch);
    ``reduction``: ``conv_bn_relu`` (official: 1x1 conv, BN, ReLU) or ``conv`` (the 1x1 conv alone).
    The 1x1 conv is ``reduce`` in both (``reduce_norm``: the BN and ReLU, None under ``conv``).
    """

    def __init__(self, channels: int, corr_channels: int = 64, radius: int = 7, sigma: float = 5.0,
                 temperature: float = 100.0, impl: str | None = None, reduction: str = "conv_bn_relu"):
        super().__init__()
        if corr_channels < 1 or radius < 1 or sigma <= 0 or temperature <= 0:
            raise ConfigError(f"MotionSqueeze (model.backbone_options) needs corr_channels >= 1, radius >= 1, "
                              f"sigma > 0, temperature > 0; "
                             f"got {corr_channels}, {radius}, {sigma}, {temperature}")
        self.radius, self.sigma, self.temperature, self.impl = int(radius), float(sigma), float(temperature), impl
        if reduction not in REDUCTIONS:
            raise ConfigError(f"'model.backbone_options.reduction' must be one of {', '.join(REDUCTIONS)}; "
                              f"got {reduction!r}")
        self.reduction = reduction
        self.reduce = nn.Conv2d(channels, corr_channels, 1, bias=False)
        self.reduce_norm = (nn.Sequential(nn.BatchNorm2d(corr_channels), nn.ReLU(inplace=True))
                            if reduction == "conv_bn_relu" else None)
        if self.reduce_norm is not None:
            self._register_load_state_dict_pre_hook(_check_reduction)
        self.transform = nn.Sequential(
            _separable(3, 16, 7),
            _separable(16, 32, 3),
            _separable(32, 64, 3),
            _separable(64, channels, 3),
        )

    def estimate_motion(self, f: torch.Tensor, num_segments: int) -> torch.Tensor:
        """Motion between consecutive frames of L2-normalised features.

        ``f: (B*T, c, H, W)`` -> ``(B*T, 3, H, W)`` channels ``(dx, dy, conf)``: frame ``t`` holds
        the motion from ``t`` to ``t+1``, the last frame repeats frame ``T-2``'s.
        ``(dx, dy)`` is in units of ``radius`` pixels (of this feature map), positive = content
        moving right / down.
        """
        t = num_segments
        if t < 2:
            raise ValueError("MotionSqueeze needs clips of at least 2 frames (raise data.clip_len); got T=1")
        bt, c, h, w = f.shape
        f = f.view(bt // t, t, c, h, w)
        f1 = f[:, :-1].reshape(-1, c, h, w)
        f2 = f[:, 1:].reshape(-1, c, h, w)
        m = local_correlation_softargmax(f1, f2, self.radius, self.sigma, self.temperature, impl=self.impl)
        m = m.view(bt // t, t - 1, 3, h, w)
        m = torch.cat([m, m[:, -1:]], dim=1)
        return m.view(bt, 3, h, w)

    def reduced(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B*T, C, H, W)`` -> ``(B*T, corr_channels, H, W)``: the channel reduction before the
        L2 normalisation (1x1 conv, + BN + ReLU under ``conv_bn_relu``)."""
        f = self.reduce(x)
        return f if self.reduce_norm is None else self.reduce_norm(f)

    def motion(self, x: torch.Tensor, num_segments: int) -> torch.Tensor:
        """``x: (B*T, C, H, W)`` -> ``(B*T, 3, H, W)``: reduce, L2-normalise, estimate motion."""
        return self.estimate_motion(F.normalize(self.reduced(x), dim=1), num_segments)

    def forward(self, x: torch.Tensor, num_segments: int) -> torch.Tensor:
        return x + self.transform(self.motion(x, num_segments))


def _check_reduction(state_dict, prefix, *_args) -> None:
    """Weights of a ``reduction="conv"`` module (every MSNet before the official BN + ReLU became the
    default) loaded into a ``conv_bn_relu`` one: say which option reads them."""
    if f"{prefix}reduce.weight" in state_dict and f"{prefix}reduce_norm.0.weight" not in state_dict:
        raise ConfigError(f"MotionSqueeze weights without the BN of the channel reduction ({prefix}reduce_norm.*): "
                          f"they were trained with the 1x1 conv alone; load them with "
                          f"model.backbone_options.reduction=conv")


class MSNet(TSMResNet):
    """TSM ResNet with MotionSqueeze after ``layer2``: ``x: (B, 3, T, H, W)`` -> ``(B, out_dim)``.

    Needs ``T >= 2``. The feature map is the TSM ResNet's (see ``TSMResNet``).
    """

    def __init__(self, block, layers, width: int = 64, corr_channels: int = 64, radius: int = 7,
                 sigma: float = 5.0, temperature: float = 100.0, impl: str | None = None,
                 reduction: str = "conv_bn_relu"):
        super().__init__(block, layers, width)
        self.motion_squeeze = MotionSqueeze(2 * width * block.expansion, corr_channels, radius, sigma,
                                            temperature, impl, reduction)

    def after_layer2(self, x: torch.Tensor, num_segments: int) -> torch.Tensor:
        return self.motion_squeeze(x, num_segments)


def msnet_resnet18(width: int = 64, corr_channels: int = 64, radius: int = 7, sigma: float = 5.0,
                   temperature: float = 100.0, impl: str | None = None, reduction: str = "conv_bn_relu") -> MSNet:
    """MSNet on TSM ResNet-18, ``out_dim = 8 * width``."""
    return MSNet(TSMBasicBlock, (2, 2, 2, 2), width, corr_channels, radius, sigma, temperature, impl, reduction)


def msnet_resnet50(width: int = 64, corr_channels: int = 64, radius: int = 7, sigma: float = 5.0,
                   temperature: float = 100.0, impl: str | None = None, reduction: str = "conv_bn_relu") -> MSNet:
    """MSNet on TSM ResNet-50, ``out_dim = 32 * width``."""
    return MSNet(TSMBottleneck, (3, 4, 6, 3), width, corr_channels, radius, sigma, temperature, impl, reduction)
