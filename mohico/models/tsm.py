"""TSM ResNet: a 2D ResNet-18/50 with the temporal shift module (Lin et al., ICCV 2019).

The 2D network runs on the frames of all clips at once, ``(B*T, C, H, W)``; ``T`` comes from the
input at run time. In every residual block the input of the residual branch is shifted along
time before ``conv1`` (the "residual shift"): 1/8 of the channels move one frame back, 1/8 one
frame forward, zero padded at the clip ends; the identity path is not shifted.

Module and parameter names follow torchvision's ``resnet18``/``resnet50`` (``conv1, bn1,
layer1..layer4``, blocks with ``conv1, bn1, ..., downsample``), so an ImageNet torchvision
ResNet state_dict (without ``fc``) loads into a standard-width TSM net with ``strict=True``.
"""
from __future__ import annotations

import torch
from torch import nn

from mohico.errors import ConfigError


def check_width(width) -> int:
    """``width`` (the ``width`` backbone option) as a positive int, else ``ConfigError``."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.backbone_options.width must be a positive integer (64 = standard), got {width!r}")
    return width


def temporal_shift(x: torch.Tensor, num_segments: int, fold_div: int = 8) -> torch.Tensor:
    """Shift channels along time: ``x: (B*T, C, H, W)`` -> same shape.

    With ``fold = C // fold_div``: channels ``[0, fold)`` of frame ``t`` take frame ``t+1``'s
    values (shift back in time), channels ``[fold, 2*fold)`` take frame ``t-1``'s (shift
    forward), the rest are unchanged; frames shifted in from outside the clip are zeros.
    """
    bt, c, h, w = x.shape
    if bt % num_segments:
        raise ValueError(f"temporal_shift: batch*frames {bt} is not a multiple of num_segments {num_segments}")
    x = x.view(bt // num_segments, num_segments, c, h, w)
    fold = c // fold_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]
    out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
    return out.view(bt, c, h, w)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class TSMBasicBlock(nn.Module):
    """ResNet basic block with a residual temporal shift. ``forward(x (B*T, C, H, W), T)``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def preact(self, x: torch.Tensor, num_segments: int):
        """``(conv2 output before bn2, identity)``; ``finish`` completes the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(temporal_shift(x, num_segments))))
        return self.conv2(out), identity

    def finish(self, pre: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(pre) + identity)

    def forward(self, x: torch.Tensor, num_segments: int) -> torch.Tensor:
        return self.finish(*self.preact(x, num_segments))


class TSMBottleneck(nn.Module):
    """ResNet bottleneck (stride on the 3x3 conv, as torchvision) with a residual temporal shift."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def preact(self, x: torch.Tensor, num_segments: int):
        """``(conv3 output before bn3, identity)``; ``finish`` completes the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(temporal_shift(x, num_segments))))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out), identity

    def finish(self, pre: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn3(pre) + identity)

    def forward(self, x: torch.Tensor, num_segments: int) -> torch.Tensor:
        return self.finish(*self.preact(x, num_segments))


class TSMResNet(nn.Module):
    """A TSM ResNet backbone: ``x: (B, 3, T, H, W)`` -> ``emb: (B, out_dim)``.

    ``emb`` is the average over frames and positions of the last stage (TSN's average
    consensus). The feature map (``return_features=True``) is the last block's last conv
    output before its BN and residual add, reshaped from ``(B*T, C, H', W')`` to
    ``(B, C, T, H', W')``; ``H' = H/32`` (rounded up). ``width`` is the stem's channel count
    (64 standard). Subclasses may override ``after_layer2(x (B*T, C, H/8, W/8), T)`` (MSNet
    puts MotionSqueeze there).
    """

    def __init__(self, block, layers, width: int = 64):
        super().__init__()
        self.width = check_width(width)
        self.torchvision_name = None   # no torchvision video model has this layout
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.out_dim = 8 * width * block.expansion
        self.feature_layer = f"layer4.{layers[3] - 1}.conv{3 if block is TSMBottleneck else 2}"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def after_layer2(self, x: torch.Tensor, num_segments: int) -> torch.Tensor:
        """Identity here; MSNet adds its motion features."""
        return x

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.dim() != 5:
            raise ValueError(f"a video backbone takes x: (B, C, T, H, W); got shape {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        x = x.transpose(1, 2).reshape(b * t, c, h, w)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for block in self.layer1:
            x = block(x, t)
        for block in self.layer2:
            x = block(x, t)
        x = self.after_layer2(x, t)
        for block in self.layer3:
            x = block(x, t)
        for block in self.layer4[:-1]:
            x = block(x, t)
        # The last block in two halves around its last conv: the map MAL differentiates is a
        # tensor the embedding is computed from, (B*T, C, H', W') viewed as (B, C, T, H', W').
        pre, identity = self.layer4[-1].preact(x, t)
        fmap = pre.view(b, t, *pre.shape[1:]).transpose(1, 2)
        x = self.layer4[-1].finish(fmap.transpose(1, 2).reshape(pre.shape), identity)
        emb = x.view(b, t, *x.shape[1:]).mean(dim=(1, 3, 4))
        return (emb, fmap) if return_features else emb


def tsm_resnet18(width: int = 64) -> TSMResNet:
    """TSM ResNet-18, ``out_dim = 8 * width`` (512 at the standard width)."""
    return TSMResNet(TSMBasicBlock, (2, 2, 2, 2), width)


def tsm_resnet50(width: int = 64) -> TSMResNet:
    """TSM ResNet-50, ``out_dim = 32 * width`` (2048 at the standard width)."""
    return TSMResNet(TSMBottleneck, (3, 4, 6, 3), width)
