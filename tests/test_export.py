"""Backbone files, torchvision export (strict round trip) and `mohico export`."""
from __future__ import annotations

import pytest
import torch
import torchvision.models.video as tvv
from torch import nn

from mohico.errors import MohicoError, UsageError
from mohico.launcher.cli import main
from mohico.models.backbones import build_backbone
from mohico.models.backbone_file import load_backbone, load_checkpoint_state, save_backbone
from mohico.models.export import export_checkpoint, to_torchvision


def _perturb(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics and affine parameters, so the round trip checks every buffer."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
            m.num_batches_tracked.fill_(7)
    return net


@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18", "s3d"])
def test_export_round_trip_into_torchvision(name, tmp_path):
    torch.manual_seed(0)
    net = _perturb(build_backbone(name)).eval()
    ckpt = save_backbone(tmp_path / "backbone.pt", name, {}, net)
    out = export_checkpoint(ckpt, tmp_path / "tv.pt")
    state = torch.load(out, map_location="cpu", weights_only=True)
    tv = getattr(tvv, name)(weights=None)
    tv.load_state_dict(state, strict=True)
    tv.eval()
    head = tv.fc if name != "s3d" else tv.classifier[1]
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0  # documented: zeros
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        ours = net(x)
        if name == "s3d":
            # torchvision's S3D head averages 2x7x7 windows (its 16x224x224 input): compare the body.
            theirs = tv.features(x).mean(dim=(2, 3, 4))
        else:
            tv.fc = nn.Identity()
            theirs = tv(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_to_torchvision_refuses_what_torchvision_cannot_hold():
    with pytest.raises(UsageError, match="width=8.*--format mohico"):
        to_torchvision(build_backbone("r3d_18", width=8))
    with pytest.raises(MohicoError, match="no torchvision video model.*--format mohico"):
        to_torchvision(build_backbone("tsm_resnet18", width=8))
    with pytest.raises(MohicoError, match="input='residual'.*--format mohico"):
        to_torchvision(build_backbone("r3d_18", input="residual"))


def test_backbone_file_round_trip(tmp_path):
    net = _perturb(build_backbone("msnet_resnet18", width=8, radius=3))
    path = save_backbone(tmp_path / "b.pt", "msnet_resnet18", {"width": 8, "radius": 3}, net)
    name, options, state = load_checkpoint_state(path)
    assert name == "msnet_resnet18" and options == {"width": 8, "radius": 3}
    _, _, again = load_backbone(path)
    for k, v in net.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert again.motion_squeeze.radius == 3
    # --format mohico rewrites the same file kind
    out = export_checkpoint(path, tmp_path / "copy.pt", "mohico")
    assert load_checkpoint_state(out)[0] == "msnet_resnet18"


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_checkpoint_state(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    good = save_backbone(tmp_path / "good.pt", "r3d_18", {"width": 8}, build_backbone("r3d_18", width=8))
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(MohicoError, match="truncated.pt: cannot read"):
        load_checkpoint_state(truncated)
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "optimizer": {}}, other)
    with pytest.raises(MohicoError, match="other.pt: not a mohico checkpoint"):
        load_checkpoint_state(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "mohico.backbone", "obj": nn.Linear(2, 2)}, pickled)  # weights_only refuses modules
    with pytest.raises(MohicoError, match="pickled.pt: cannot read"):
        load_checkpoint_state(pickled)
    mismatched = tmp_path / "mismatched.pt"
    save_backbone(mismatched, "r3d_18", {"width": 16}, build_backbone("r3d_18", width=8))
    with pytest.raises(MohicoError, match="mismatched.pt: weights do not fit backbone 'r3d_18'"):
        load_backbone(mismatched)


def test_export_command(tmp_path, capsys):
    ckpt = save_backbone(tmp_path / "ckpt.pt", "s3d", {}, build_backbone("s3d"))
    out = tmp_path / "exported" / "s3d.pt"
    assert main(["export", str(ckpt), str(out)]) == 0
    tvv.s3d().load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert [p.name for p in out.parent.iterdir()] == ["s3d.pt"]  # no temp files left behind

    assert main(["export", str(tmp_path / "nope.pt"), str(out)]) == 2
    assert "nope.pt: no such checkpoint file" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), str(tmp_path / "x.pt")]) == 1
    assert "bad.pt: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    thin = save_backbone(tmp_path / "thin.pt", "r3d_18", {"width": 8}, build_backbone("r3d_18", width=8))
    assert main(["export", str(thin), str(tmp_path / "y.pt")]) == 2      # a usage error, with its fix
    err = capsys.readouterr().err
    assert "width=8" in err and "--format mohico" in err
    assert main(["export", str(thin), str(tmp_path / "y.pt"), "--format", "mohico"]) == 0
