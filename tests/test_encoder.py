"""The encoder one import away: mohico.load_encoder, the recorded preprocessing, torch.hub."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mohico
from mohico.config import load_config, to_dict
from mohico.errors import MohicoError
from mohico.models.backbones import build_backbone
from mohico.models.encoder import Preprocessing
from mohico.models.backbone_file import save_backbone
from mohico.models.export import export_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def fake_run(tmp_path: Path, fps: int = 15) -> tuple[Path, torch.nn.Module]:
    """A run directory as the trainer leaves it (DeepSpeed module file + meta with the config), whose
    shards folder has a manifest recording the frame rate."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"")
    (shards / "manifest.json").write_text(json.dumps({"options": {"fps": fps}, "shards": []}))
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"data.shards={shards}", "data.clip_len=6",
                                                           "data.frame_stride=3", "data.crop_size=40"])
    torch.manual_seed(0)
    net = build_backbone(cfg.model.backbone, **cfg.model.backbone_options)
    for p in net.parameters():
        p.data.add_(torch.randn_like(p))
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    torch.save({"module": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, tag / "mp_rank_00_model_states.pt")
    (tag / "mohico_meta.json").write_text(json.dumps({"step": 2, "config": to_dict(cfg)}))
    (tag.parent / "latest").write_text("step_00000002")
    return tmp_path / "run", net.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_encoder_from_a_run_and_from_its_export(tmp_path):
    run, net = fake_run(tmp_path)
    enc, prep = mohico.load_encoder(run)
    assert not enc.training and enc.preprocessing is prep
    assert_same_weights(enc, net)
    assert prep == Preprocessing(mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), clip_len=6, frame_stride=3,
                                 crop_size=40, fps=15.0)
    assert prep.sampling_rate == 5.0
    # an exported backbone file records the preprocessing; it loads without the run
    out = export_checkpoint(run, tmp_path / "backbone.pt", "mohico")
    assert torch.load(out, weights_only=True)["preprocessing"] == prep.to_dict()
    import shutil
    shutil.rmtree(run)
    enc2, prep2 = mohico.load_encoder(out)
    assert prep2 == prep
    assert_same_weights(enc2, net)
    x = torch.randn(2, 3, 6, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(enc2(x), net(x), rtol=0, atol=0)


def test_torch_hub_local(tmp_path):
    run, net = fake_run(tmp_path)
    enc = torch.hub.load(str(ROOT), "mohico_encoder", source="local", path=str(run))
    assert_same_weights(enc, net)
    assert enc.preprocessing.clip_len == 6 and not enc.training


def test_torchvision_export_writes_its_preprocessing_beside_it(tmp_path):
    net = build_backbone("r3d_18")
    f = save_backbone(tmp_path / "b.pt", "r3d_18", {}, net,
                      Preprocessing((0.4, 0.5, 0.6), (0.2, 0.2, 0.3), 16, 2, 112, 30.0).to_dict())
    export_checkpoint(f, tmp_path / "tv.pt", "torchvision")
    side = json.loads((tmp_path / "tv.pt.json").read_text())
    assert side["backbone"] == "r3d_18" and side["preprocessing"]["fps"] == 30.0
    assert side["preprocessing"]["mean"] == [0.4, 0.5, 0.6]


def test_old_backbone_file_without_preprocessing_says_what_to_do(tmp_path):
    f = save_backbone(tmp_path / "old.pt", "r3d_18", {"width": 8}, build_backbone("r3d_18", width=8))
    with pytest.raises(MohicoError, match="records no preprocessing.*config=RUN_DIR/config.yaml"):
        mohico.load_encoder(f)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"defaults: [{ROOT / 'configs' / 'tiny_cpu.yaml'}]\ndata: {{shards: ''}}\n")
    _, prep = mohico.load_encoder(f, config=cfg)
    # tiny_cpu counts its stride at data.reference_fps = 15: the rate is known without the shards
    assert prep.clip_len == 4 and prep.crop_size == 32 and prep.fps == 15.0 and prep.sampling_rate == 7.5
    cfg.write_text(f"defaults: [{ROOT / 'configs' / 'tiny_cpu.yaml'}]\ndata: {{shards: '', reference_fps: 0}}\n")
    _, prep = mohico.load_encoder(f, config=cfg)
    assert prep.fps is None and prep.sampling_rate is None


def test_preprocessing_rate_is_the_reference_fps_whatever_the_shards_fps(tmp_path):
    """Strides count at data.reference_fps: 3 frames at 15 fps = 5 clip frames/s, even on 30 fps shards."""
    run, _ = fake_run(tmp_path, fps=30)
    _, prep = mohico.load_encoder(run)
    assert prep.fps == 15.0 and prep.frame_stride == 3 and prep.sampling_rate == 5.0


def test_preprocessing_call_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(20, 32, 48, 3), dtype=np.uint8)
    prep = Preprocessing((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), clip_len=4, frame_stride=3, crop_size=32)
    x = prep(frames)
    assert x.shape == (1, 3, 4, 32, 32) and x.dtype == torch.float32
    # short side already 32: no resize; the middle 10 frames (start 5), every 3rd; centre crop of width 48
    ref = frames[[5, 8, 11, 14], :, 8:40].astype(np.float64) / 255.0
    ref = (ref - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(3, 0, 1, 2), rtol=0, atol=1e-5)
    # a larger video: short side resized to the crop size, square output
    big = rng.integers(0, 256, size=(3, 90, 160, 3), dtype=np.uint8)
    y = prep(big)
    assert y.shape == (1, 3, 4, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        prep(big[..., 0])
