"""`mohico export` on DeepSpeed's zero_to_fp32 output (the consolidated fp32 state dict)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mohico.config import load_config, save_config
from mohico.errors import UsageError
from mohico.models.backbone_file import load_backbone, load_checkpoint_state
from mohico.models.export import export_checkpoint
from mohico.models.pretrain import PretrainModule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module_and_cfg():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    torch.manual_seed(0)
    return PretrainModule(cfg), cfg


def _same_backbone(state: dict, module: PretrainModule) -> None:
    want = module.backbone.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        assert torch.equal(state[k], want[k]), k


def test_single_file_with_config_found_in_a_parent(module_and_cfg, tmp_path):
    module, cfg = module_and_cfg
    save_config(cfg, tmp_path / "run" / "config.yaml")
    out = tmp_path / "run" / "fp32"
    out.mkdir(parents=True)
    torch.save(module.state_dict(), out / "pytorch_model.bin")
    for ckpt in (out, out / "pytorch_model.bin"):
        name, options, state = load_checkpoint_state(ckpt)
        assert (name, options) == (cfg.model.backbone, cfg.model.backbone_options)
        _same_backbone(state, module)
    export_checkpoint(out, tmp_path / "b.pt", fmt="mohico")
    _, _, backbone = load_backbone(tmp_path / "b.pt")
    _same_backbone(backbone.state_dict(), module)


def test_sharded_output_with_explicit_config(module_and_cfg, tmp_path):
    module, cfg = module_and_cfg
    state = module.state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    out = tmp_path / "fp32"
    out.mkdir()
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for fname, ks in shards.items():
        torch.save({k: state[k] for k in ks}, out / fname)
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    with pytest.raises(UsageError, match="--config"):
        load_checkpoint_state(out)                     # nothing names the backbone
    cfg_file = save_config(cfg, tmp_path / "elsewhere" / "config.yaml")
    _, _, got = load_checkpoint_state(out, config=cfg_file)
    _same_backbone(got, module)
    (out / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(Exception, match="missing"):
        load_checkpoint_state(out, config=cfg_file)


@pytest.mark.slow
@pytest.mark.dist
def test_real_zero_to_fp32_output_exports_like_the_run(synth_shards, tmp_path):
    """Train 2 steps at ZeRO-1, consolidate with DeepSpeed's zero_to_fp32, export both forms."""
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "mohico", "train", str(ROOT / "configs" / "tiny_cpu.yaml"), f"run.dir={run}",
           f"data.shards={synth_shards}", "trainer.max_steps=2", "checkpoint.every_steps=2", "data.num_workers=0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(run / "checkpoints"), str(tmp_path / "fp32"))
    export_checkpoint(run, tmp_path / "from_run.pt", fmt="mohico")
    export_checkpoint(tmp_path / "fp32", tmp_path / "from_fp32.pt", fmt="mohico",
                      config=run / "config.yaml")
    a = torch.load(tmp_path / "from_run.pt", weights_only=True)
    b = torch.load(tmp_path / "from_fp32.pt", weights_only=True)
    assert (a["name"], a["options"]) == (b["name"], b["options"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
