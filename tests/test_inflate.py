"""``model.init``: 2D ImageNet ResNet-18 weights inflated into R3D-18 / R(2+1)D-18 (mohico.models.inflate).

The references are torchvision's own 2D ResNet-18 (the network the weights come from) and the
definitions written out with ``F.conv2d`` / ``F.batch_norm``, in float64. The 2D state_dicts are
made here from a seeded ``torchvision.models.resnet18()`` (nothing is downloaded), with BN
statistics and affine parameters drawn away from their identity defaults so a BN mapped to the
wrong place shows, and conv weights rounded to multiples of 3 * 2^-12 so that the inflated
``W / 3`` is exact in float32 and the identity can be checked at float64 precision.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mohico.config import load_config
from mohico.errors import ConfigError
from mohico.models.backbones import build_backbone
from mohico.models.inflate import inflate_into, load_init, read_2d_state

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def resnet18_2d(seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):   # multiples of 3 * 2^-12: W / 3 is exact in float32, so the
                m.weight.copy_(3 * torch.round(m.weight / 3 * 4096) / 4096)   # identity holds to float64 rounding
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def net2d():
    return resnet18_2d()


@pytest.fixture(scope="module")
def weights_file(net2d, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init") / "resnet18.pt"
    torch.save(net2d.state_dict(), path)
    return path


def frames(x2d: torch.Tensor, t: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, t, H, W)``: ``t`` identical frames."""
    return x2d.unsqueeze(2).repeat(1, 1, t, 1, 1)


@pytest.mark.slow
def test_inflated_r3d_reproduces_the_2d_network_on_a_clip_of_identical_frames(net2d, weights_file):
    """The inflation identity: stem, layer1 and layer2 (its temporal stride and downsample included) of
    the inflated R3D-18 give the 2D ResNet-18's activations at every frame the zero temporal padding
    does not reach."""
    r3d = build_backbone("r3d_18")
    report = load_init(r3d, weights_file)
    assert not report.not_fitting and not report.left_random and report.unused == []
    r3d, n2 = r3d.double().eval(), copy.deepcopy(net2d).double().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        stem2d = n2.relu(n2.bn1(n2.conv1(x)))
        stem3d = r3d.stem(frames(x, 6))
        for t in range(1, 5):                                    # frames 0 and 5 see the zero padding
            torch.testing.assert_close(stem3d[:, :, t], stem2d, rtol=1e-10, atol=1e-10)
        # at the ends a third of the kernel meets zeros: the 2D response without them is wrong there
        assert (stem3d[:, :, 0] - stem2d).abs().max() > 1e-3
        h = n2.maxpool(stem2d)
        l1_3d = r3d.layer1(frames(h, 12))
        l1_2d = n2.layer1(h)
        for t in range(4, 8):                                    # 4 temporal convs: 4 frames from each end
            torch.testing.assert_close(l1_3d[:, :, t], l1_2d, rtol=1e-10, atol=1e-10)
        l2_3d = r3d.layer2(frames(l1_2d, 24))                    # time stride 2: 24 -> 12 frames
        l2_2d = n2.layer2(l1_2d)
        assert l2_3d.shape[2] == 12
        for t in range(4, 9):
            torch.testing.assert_close(l2_3d[:, :, t], l2_2d, rtol=1e-10, atol=1e-10)


def test_inflated_kernels_are_the_2d_kernel_repeated_over_time_divided_by_its_length(net2d, weights_file):
    r3d = build_backbone("r3d_18")
    load_init(r3d, weights_file)
    sd2, sd3 = net2d.state_dict(), r3d.state_dict()
    for k2, k3 in (("conv1.weight", "stem.0.weight"), ("layer3.1.conv2.weight", "layer3.1.conv2.0.weight"),
                   ("layer4.0.downsample.0.weight", "layer4.0.downsample.0.weight")):
        kt = sd3[k3].shape[2]
        for t in range(kt):
            torch.testing.assert_close(sd3[k3][:, :, t].double(), sd2[k2].double() / kt, rtol=0, atol=1e-7)
    for p in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(sd3[f"layer2.0.conv2.1.{p}"], sd2[f"layer2.0.bn2.{p}"])


def test_r2plus1d_takes_the_2d_kernel_in_its_spatial_conv_and_an_identity_in_time(net2d, weights_file, caplog):
    """Each (2+1)D conv + BN + ReLU of a block, on a clip whose frames all differ, equals frame by frame
    ``relu(bn_2d(relu(conv_2d(x) / sqrt(1 + eps))))``: the 2D kernel in the spatial conv, a fresh mid BN
    (identity in eval up to eps), the temporal conv the identity in time, the 2D BN after it. The stem
    (45 mid channels < conv1's 64) does not fit and is named."""
    torch.manual_seed(3)
    net = build_backbone("r2plus1d_18")
    stem_before = net.stem[0].weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="mohico.models"):
        report = load_init(net, weights_file)
    assert any(s.startswith("conv1.weight (64, 3, 7, 7) -> stem.0.weight (45, 3, 1, 7, 7)") for s in report.not_fitting)
    assert any(s.startswith("bn1.weight") for s in report.not_fitting)
    assert "did not fit" in caplog.text and "conv1.weight" in caplog.text
    assert torch.equal(net.stem[0].weight, stem_before)
    net = net.double().eval()
    sd2 = {k: v.double() for k, v in net2d.state_dict().items()}
    block = net.layer2[1].conv1                                  # Sequential(Conv2Plus1D, BN, ReLU), 128 -> 128
    assert block[0][0].weight.shape[0] > 128                     # mid channels beyond the 2D kernel's
    x = torch.randn(2, 128, 5, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        for t in range(5):
            a = F.relu(F.conv2d(x[:, :, t], sd2["layer2.1.conv1.weight"], padding=1) / math.sqrt(1 + 1e-5))
            ref = F.relu(F.batch_norm(a, sd2["layer2.1.bn1.running_mean"], sd2["layer2.1.bn1.running_var"],
                                      sd2["layer2.1.bn1.weight"], sd2["layer2.1.bn1.bias"], eps=1e-5))
            torch.testing.assert_close(y[:, :, t], ref, rtol=1e-10, atol=1e-10)
    temporal = net.layer2[1].conv1[0][3].weight                 # (128, M, 3, 1, 1)
    assert temporal[:, :, 1, 0, 0][:, :128].equal(torch.eye(128, dtype=torch.float64))
    assert temporal.abs().sum() == 128


@pytest.mark.slow
def test_a_moco_v2_checkpoint_gives_its_query_encoder(net2d, tmp_path):
    sd = net2d.state_dict()
    other = resnet18_2d(seed=7).state_dict()
    ckpt = {"epoch": 200, "arch": "resnet18",
            "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
                           "module.encoder_q.fc.0.weight": torch.randn(512, 512),
                           "module.encoder_q.fc.2.weight": torch.randn(128, 512),
                           **{f"module.encoder_k.{k}": v for k, v in other.items()},
                           "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(ckpt, path)
    state = read_2d_state(path)
    assert set(state) == {k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert all(torch.equal(state[k], sd[k]) for k in state)
    r3d = build_backbone("r3d_18")
    report = inflate_into(r3d, state)
    assert not report.not_fitting and not report.unused
    torch.testing.assert_close(r3d.stem[0].weight[:, :, 1], sd["conv1.weight"] / 3)


def test_a_resnet50_checkpoint_is_refused_not_mixed_in(tmp_path):
    """The fault: the released MoCo v2 checkpoint (a ResNet-50, what MCL's official code starts from)
    given to model.init loaded 80 tensors whose names and shapes happened to match R(2+1)D-18 (BNs,
    some 3x3 convs) and left the rest random: a silent mix. A bottleneck ResNet is refused."""
    from torchvision.models import resnet50

    sd = resnet50().state_dict()
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()}}, path)
    with pytest.raises(ConfigError, match=r"'model.init': .*moco_v2_200ep_pretrain.pth.tar holds a bottleneck ResNet "
                                          r"\(ResNet-50 or deeper.*layer1.0.conv3.weight.*ResNet-18"):
        read_2d_state(path)


class _NotATensor:
    pass


def test_files_that_are_not_resnet_weights_are_refused_naming_the_key(tmp_path, weights_file):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"conv1.weight": _NotATensor()}, unsafe)
    with pytest.raises(ConfigError, match=r"'model.init': cannot read .*unsafe.pt with torch.load\(weights_only=True\)"):
        read_2d_state(unsafe)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(ConfigError, match="not a ResNet state_dict"):
        read_2d_state(other)
    with pytest.raises(ConfigError, match="is not a file"):
        read_2d_state(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="nothing of .* fits backbone r3d_18 \\(width 8"):
        load_init(build_backbone("r3d_18", width=8), weights_file)
    with pytest.raises(ConfigError, match="r3d_18 or r2plus1d_18"):
        load_init(build_backbone("s3d", width=8), weights_file)


def test_unused_2d_keys_are_named(net2d, tmp_path, caplog):
    path = tmp_path / "extra.pt"
    torch.save({**net2d.state_dict(), "layer5.0.conv1.weight": torch.zeros(1, 1, 3, 3)}, path)
    with caplog.at_level(logging.INFO, logger="mohico.models"):
        report = load_init(build_backbone("r3d_18"), path)
    assert report.unused == ["layer5.0.conv1.weight"] and "unused 2D keys (1): layer5.0.conv1.weight" in caplog.text


@pytest.mark.slow
def test_the_pretrain_module_starts_from_the_inflated_weights_and_a_resume_builds_without_them(weights_file, net2d):
    from mohico.models.pretrain import PretrainModule, without_init

    cfg = load_config(TINY, ["model.backbone_options={}", f"model.init={weights_file}"])
    module = PretrainModule(cfg)
    w = net2d.state_dict()["layer1.0.conv1.weight"] / 3
    torch.testing.assert_close(module.backbone.layer1[0].conv1[0].weight[:, :, 0], w)
    torch.testing.assert_close(module.key_encoder.backbone.layer1[0].conv1[0].weight[:, :, 0], w)
    gone = load_config(TINY, ["model.backbone_options={}", "model.init=/nonexistent/resnet18.pt"])
    with pytest.raises(ConfigError, match="model.init"):
        PretrainModule(gone)
    assert without_init(gone).model.init == "" and gone.model.init
    PretrainModule(without_init(gone))                           # a resumed run never reads the file


def test_model_init_config_rules():
    with pytest.raises(ConfigError, match="'model.init'.*r3d_18 or r2plus1d_18"):
        load_config(TINY, ["model.backbone=s3d", "model.init=x.pt"])
    with pytest.raises(ConfigError, match="'model.init'.*finetune.backbone"):
        load_config(TINY, ["model.init=x.pt", "finetune.backbone=random"])
    assert load_config(TINY).model.init == ""


def test_dry_run_reads_the_init_file(tmp_path, capsys, weights_file):
    from mohico.launcher.cli import main

    from tests._fake_shards import fake_shards

    shards = fake_shards(tmp_path / "shards", [[40, 40], [40, 40]])            # what the dry run reads of them
    base = ["train", str(TINY), f"run.dir={tmp_path / 'run'}", f"data.shards={shards}", "model.backbone_options={}"]
    assert main([*base, f"model.init={tmp_path / 'missing.pt'}", "--dry-run"]) == 2
    assert "'model.init'" in capsys.readouterr().err
    assert main([*base, f"model.init={weights_file}", "--dry-run"]) == 0
    assert "model.init: 100 2D tensors" in capsys.readouterr().err
