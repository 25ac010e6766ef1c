"""Video backbones and their registry.

``build_backbone(name, **options)`` builds any name in ``BACKBONES``. Every backbone maps
``x: (B, C, T, H, W)`` to a pooled embedding ``(B, D)`` (global average pool, no classifier),
has ``out_dim == D`` and, with ``forward(x, return_features=True)``, also returns the late
feature map MCL's motion alignment loss differentiates, ``fmap: (B, C', T', H', W')``.

Which map: the output of the *last convolution of the last block, before its batch norm,
residual add and ReLU* (docs/METHODS.md section 1.3: the official MAL hook). Each backbone names it
in ``feature_layer`` (a ``named_modules()`` path). It must sit before a non-linearity: the
embedding is a plain mean of the last block's output, so the gradient of the embedding with
respect to that output is the same at every position and a Grad-CAM map of it is flat.

The R3D-18, R(2+1)D-18 and S3D nets here are built from torchvision's own blocks with
torchvision's module names, so at the standard width their ``state_dict()`` is exactly
torchvision's minus the classifier (``mohico.models.export.to_torchvision`` adds it back); an
S3D with ``gating=True`` (S3D-G) has its gates on top (``gates.*``) and no torchvision counterpart.
torchvision is imported when one of them is built (:func:`_torchvision_blocks`), not with this
module: a TSM or MSNet run, and every import of the training path, does without it.
``width`` (base channel count, 64 = standard) thins a net for tiny CPU runs. No pretrained
weights are ever downloaded.

``input`` (R3D, R(2+1)D, S3D): ``"rgb"`` (default) feeds the clip as is; ``"residual"`` feeds its
*residual frames* ``x[t+1] - x[t]`` (Tao et al. 2020, "Rethinking Motion Representation: Residual
Frames with 3D ConvNets"); ``"rgb+residual"`` both, stacked on channels (a 6-channel first
convolution). They are computed inside ``forward`` from the same normalised RGB clip, so the
loader, the motion targets and every eval path are unchanged and the option travels with the
backbone's name and options (checkpoints, backbone files). Under ``residual`` still content (a
static background) differences to zero: the net sees what moves; a thin net that cannot learn
motion from RGB at a CPU budget learns it from residual frames
(benchmarks/reports/2026-11-26-motion-benchmark-residual-input.md). ``residual`` adds no
parameters (the ``state_dict`` is the RGB net's); either mode exports as ``--format mohico`` only,
torchvision's models taking RGB.
"""
from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from mohico.config_backbones import check_backbone
from mohico.errors import ConfigError
from mohico.models.motionsqueeze import msnet_resnet18, msnet_resnet50
from mohico.models.tsm import check_width, tsm_resnet18, tsm_resnet50

STANDARD_WIDTH = 64


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"a video backbone takes x: (B, C, T, H, W); got shape {tuple(x.shape)}")


INPUTS = ("rgb", "residual", "rgb+residual")
INPUT_CHANNELS = {"rgb": 3, "residual": 3, "rgb+residual": 6}


def check_input_mode(mode: str) -> str:
    if mode not in INPUTS:
        raise ConfigError(f"'model.backbone_options.input' must be one of {', '.join(INPUTS)}; got {mode!r}")
    return mode


def prepare_input(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The tensor the first convolution sees: ``x`` (``rgb``), :func:`residual_frames` of ``x``
    (``residual``) or both stacked on channels (``rgb+residual``: ``(B, 2C, T, H, W)``)."""
    if mode == "rgb":
        return x
    if mode == "residual":
        return residual_frames(x)
    return torch.cat([x, residual_frames(x)], dim=1)


def residual_frames(x: torch.Tensor) -> torch.Tensor:
    """``x: (B, C, T, H, W) -> (B, C, T, H, W)``: ``r[t] = x[t+1] - x[t]`` for ``t < T-1`` and the
    last difference repeated at ``T-1`` (the clip keeps its length, so feature maps keep their
    shape; a one-frame clip gives zeros)."""
    if x.shape[2] < 2:
        return torch.zeros_like(x)
    r = x[:, :, 1:] - x[:, :, :-1]
    return torch.cat([r, r[:, :, -1:]], dim=2)


def _torchvision_blocks():
    """torchvision's video blocks, imported on the first R3D / R(2+1)D / S3D built. Importing
    torchvision takes about a second, most of it torch._dynamo (pulled in by torchvision.ops), which
    a training rank imports anyway with its first optimizer (torch.optim's _disable_dynamo) and
    DeepSpeed: what a rank saves is torchvision's own ~0.1-0.3 s; an import of the module alone
    (tests, tools) saves the second."""
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DSimple
    from torchvision.models.video.s3d import SepInceptionBlock3D, TemporalSeparableConv
    from torchvision.ops.misc import Conv3dNormActivation

    return SimpleNamespace(BasicBlock=BasicBlock, Conv2Plus1D=Conv2Plus1D, Conv3DSimple=Conv3DSimple,
                           SepInceptionBlock3D=SepInceptionBlock3D, TemporalSeparableConv=TemporalSeparableConv,
                           Conv3dNormActivation=Conv3dNormActivation)


def _scaled(channels: int, width: int) -> int:
    """A channel count of the standard (width 64) net scaled to ``width``."""
    return max(1, round(channels * width / STANDARD_WIDTH))


# --------------------------------------------------------------------------- VideoResNet (R3D, R(2+1)D)

class _R3DStem(nn.Sequential):
    """torchvision's BasicStem at a given width: conv 3x7x7 /(1,2,2), BN, ReLU."""

    def __init__(self, width: int, in_channels: int = 3):
        super().__init__(
            nn.Conv3d(in_channels, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


class _R2Plus1DStem(nn.Sequential):
    """torchvision's R2Plus1dStem at a given width: conv 1x7x7 (45 mid channels at width 64), conv 3x1x1."""

    def __init__(self, width: int, in_channels: int = 3):
        mid = _scaled(45, width)
        super().__init__(
            nn.Conv3d(in_channels, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


class VideoResNet(nn.Module):
    """torchvision's VideoResNet-18 (R3D-18 or R(2+1)D-18) without the classifier, at any width.

    Stages ``stem, layer1..layer4`` (torchvision's names); ``x: (B, 3, T, H, W)`` ->
    ``emb: (B, 8 * width)``; the feature map is the pre-BN output of ``layer4[-1].conv2[0]``,
    ``(B, 8 * width, T/8, H/16, W/16)`` (rounded up). ``input``: the stem sees
    :func:`prepare_input` of ``x`` (the clip, its residual frames, or both).
    """

    feature_layer = "layer4.1.conv2.0"

    def __init__(self, conv_builder, stem: Callable[[int], nn.Module], torchvision_name: str,
                 width: int = STANDARD_WIDTH, layers=(2, 2, 2, 2), input: str = "rgb"):
        super().__init__()
        self.width = check_width(width)
        self.input = check_input_mode(input)
        self.torchvision_name = torchvision_name
        self.stem = stem(width, INPUT_CHANNELS[input])
        self.inplanes = width
        self.layer1 = self._make_layer(conv_builder, width, layers[0], stride=1)
        self.layer2 = self._make_layer(conv_builder, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(conv_builder, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(conv_builder, 8 * width, layers[3], stride=2)
        self.out_dim = 8 * width * _torchvision_blocks().BasicBlock.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, conv_builder, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=conv_builder.get_downsample_stride(stride),
                          bias=False),
                nn.BatchNorm3d(planes),
            )
        BasicBlock = _torchvision_blocks().BasicBlock
        layers = [BasicBlock(self.inplanes, planes, conv_builder, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, conv_builder) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        _check_input(x)
        x = self.layer3(self.layer2(self.layer1(self.stem(prepare_input(x, self.input)))))
        for block in self.layer4[:-1]:
            x = block(x)
        # The last block, as torchvision's BasicBlock.forward computes it, keeping the map
        # between its last convolution and that convolution's batch norm.
        last = self.layer4[-1]
        residual = x if last.downsample is None else last.downsample(x)
        fmap = last.conv2[0](last.conv1(x))
        x = last.relu(last.conv2[1](fmap) + residual)
        emb = x.mean(dim=(2, 3, 4))
        return (emb, fmap) if return_features else emb


def r3d_18(width: int = STANDARD_WIDTH, input: str = "rgb") -> VideoResNet:
    """R3D-18 (torchvision layout), ``out_dim = 8 * width`` (512 at the standard width)."""
    return VideoResNet(_torchvision_blocks().Conv3DSimple, _R3DStem, "r3d_18", width, input=input)


def r2plus1d_18(width: int = STANDARD_WIDTH, input: str = "rgb") -> VideoResNet:
    """R(2+1)D-18 (torchvision layout), ``out_dim = 8 * width`` (512 at the standard width)."""
    return VideoResNet(_torchvision_blocks().Conv2Plus1D, _R2Plus1DStem, "r2plus1d_18", width, input=input)


# --------------------------------------------------------------------------- S3D

# torchvision's S3D inception blocks: (b0_out, b1_mid, b1_out, b2_mid, b2_out, b3_out) at width 64.
_S3D_BLOCKS = {
    5: (64, 96, 128, 16, 32, 32), 6: (128, 128, 192, 32, 96, 64),
    8: (192, 96, 208, 16, 48, 64), 9: (160, 112, 224, 24, 64, 64), 10: (128, 128, 256, 24, 64, 64),
    11: (112, 144, 288, 32, 64, 64), 12: (256, 160, 320, 32, 128, 128),
    14: (256, 160, 320, 32, 128, 128), 15: (384, 192, 384, 48, 128, 128),
}


class SelfGating(nn.Module):
    """S3D-G's feature gating (Xie et al. 2018): ``x * sigmoid(W @ mean_{t,h,w}(x) + b)`` per channel,
    ``x: (B, C, T, H, W)``, ``W: (C, C)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))[:, :, None, None, None]


def _branches(block: nn.Module) -> tuple[nn.Module, ...]:
    return block.branch0, block.branch1, block.branch2, block.branch3


class S3D(nn.Module):
    """torchvision's S3D (S3D-G body) without the classifier, at any width.

    ``features`` holds torchvision's 16 modules under the same indices. ``x: (B, 3, T, H, W)``
    with ``T >= 5`` -> ``emb: (B, 16 * width)`` (1024 at the standard width), a global average
    pool of ``features`` (torchvision's own head averages 2x7x7 windows, which equals it at
    its 16x224x224 input). The feature map is the concatenation of the four branches of the
    last inception block taken after their last convolution, before its BN and ReLU:
    ``(B, 16 * width, T/8, H/32, W/32)`` (rounded up). ``input``: the first convolution sees
    :func:`prepare_input` of ``x`` (the clip, its residual frames, or both).

    ``gating`` (S3D-G): every inception block gates each of its four branches' outputs with a
    :class:`SelfGating` (``gates[str(index)]``, one per branch, as the S3D-G of the official HiCo
    code and of MIL-NCE); torchvision's S3D has none (the default). ``bn_momentum``: PyTorch's BN
    momentum (torchvision: 0.001; the official HiCo S3D-G: PyTorch's 0.1). A gated net's
    ``features`` keep torchvision's names, the gates are extra (no torchvision export).
    """

    feature_layer = "features.15"

    def __init__(self, width: int = STANDARD_WIDTH, input: str = "rgb", gating: bool = False,
                 bn_momentum: float = 0.001):
        super().__init__()
        self.width = check_width(width)
        self.input = check_input_mode(input)
        if not isinstance(gating, bool):
            raise ConfigError(f"'model.backbone_options.gating' must be true or false; got {gating!r}")
        if not 0.0 < float(bn_momentum) <= 1.0:
            raise ConfigError(f"'model.backbone_options.bn_momentum' must lie in (0, 1]; got {bn_momentum!r}")
        self.gating, self.bn_momentum = gating, float(bn_momentum)
        self.torchvision_name = "s3d"
        tv = _torchvision_blocks()
        norm = partial(nn.BatchNorm3d, eps=0.001, momentum=self.bn_momentum)
        c = partial(_scaled, width=width)
        modules: list[nn.Module] = [
            tv.TemporalSeparableConv(INPUT_CHANNELS[self.input], c(64), 7, 2, 3, norm),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            tv.Conv3dNormActivation(c(64), c(64), kernel_size=1, stride=1, norm_layer=norm),
            tv.TemporalSeparableConv(c(64), c(192), 3, 1, 1, norm),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        ]
        in_planes = c(192)
        for index in range(5, 16):
            if index == 7:
                modules.append(nn.MaxPool3d(kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1)))
            elif index == 13:
                modules.append(nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=(0, 0, 0)))
            else:
                b0, b1m, b1o, b2m, b2o, b3o = (c(n) for n in _S3D_BLOCKS[index])
                modules.append(tv.SepInceptionBlock3D(in_planes, b0, b1m, b1o, b2m, b2o, b3o, norm))
                in_planes = b0 + b1o + b2o + b3o
        self.features = nn.Sequential(*modules)
        self.out_dim = in_planes
        self.gates = nn.ModuleDict({
            str(i): nn.ModuleList(SelfGating(_out_channels(b)) for b in _branches(m))
            for i, m in enumerate(modules) if isinstance(m, tv.SepInceptionBlock3D)}) if gating else None

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``features[index]`` on ``x``, its branches gated when ``gating``."""
        block = self.features[index]
        if self.gates is None or str(index) not in self.gates:
            return block(x)
        return torch.cat([g(b(x)) for g, b in zip(self.gates[str(index)], _branches(block))], 1)

    def _last_block(self, block: nn.Module, x: torch.Tensor):
        """SepInceptionBlock3D.forward (gated when ``gating``), also returning each branch's last
        conv output before BN+ReLU (the map, never gated)."""
        branches = (  # (modules before the last Conv3dNormActivation, that Conv3dNormActivation)
            ((), block.branch0),
            ((block.branch1[0], block.branch1[1][0]), block.branch1[1][1]),
            ((block.branch2[0], block.branch2[1][0]), block.branch2[1][1]),
            ((block.branch3[0],), block.branch3[1]),
        )
        pre = []
        for prefix, last in branches:
            h = x
            for m in prefix:
                h = m(h)
            pre.append(last[0](h))                   # the branch's last conv
        fmap = torch.cat(pre, 1)
        # BN + ReLU per branch on slices of the returned map, so the embedding is computed from it.
        parts = fmap.split([a.shape[1] for a in pre], dim=1)
        outs = [last[2](last[1](a)) for a, (_, last) in zip(parts, branches)]
        gates = None if self.gates is None else self.gates[str(len(self.features) - 1)]
        if gates is not None:
            outs = [g(o) for g, o in zip(gates, outs)]
        return torch.cat(outs, 1), fmap

    def forward(self, x: torch.Tensor, return_features: bool = False):
        _check_input(x)
        if x.shape[2] < 5:
            raise ValueError(f"S3D needs clips of at least 5 frames; got T={x.shape[2]} (raise data.clip_len)")
        x = prepare_input(x, self.input)
        for index in range(len(self.features) - 1):
            x = self._block(index, x)
        x, fmap = self._last_block(self.features[-1], x)
        emb = x.mean(dim=(2, 3, 4))
        return (emb, fmap) if return_features else emb


def _out_channels(branch: nn.Module) -> int:
    """Output channels of an inception branch (its last convolution's)."""
    return [m for m in branch.modules() if isinstance(m, nn.Conv3d)][-1].out_channels


def s3d(width: int = STANDARD_WIDTH, input: str = "rgb", gating: bool = False, bn_momentum: float = 0.001) -> S3D:
    """S3D (torchvision layout), ``out_dim = 16 * width`` (1024 at the standard width); ``gating=True``
    and ``bn_momentum=0.1``: S3D-G as the official HiCo code has it."""
    return S3D(width, input=input, gating=gating, bn_momentum=bn_momentum)


# --------------------------------------------------------------------------- registry

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "r3d_18": r3d_18,
    "r2plus1d_18": r2plus1d_18,
    "s3d": s3d,
    "tsm_resnet18": tsm_resnet18,
    "tsm_resnet50": tsm_resnet50,
    "msnet_resnet18": msnet_resnet18,
    "msnet_resnet50": msnet_resnet50,
}


def build_backbone(name: str, **options) -> nn.Module:
    """Build the backbone registered as ``name`` with ``options`` (e.g. ``width=8``).

    Unknown names and options raise ``ConfigError`` listing the valid ones
    (:func:`mohico.config_backbones.check_backbone`, the check the config runs too).
    """
    check_backbone(name, options)
    return BACKBONES[name](**options)
