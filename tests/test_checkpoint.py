"""Checkpoint protocol units: publishing, pruning, interrupted saves, resolution, config checks,
RNG state, bank resharding. (End-to-end DeepSpeed checkpoints: tests/test_trainer.py.)"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.config import config_hash, load_config, to_dict
from mohico.errors import MohicoError
from mohico.trainer import checkpoint as ck
from mohico.trainer.checkpoint.resume import pick_resume
from mohico.trainer.rng import rng_state, set_rng_state
from tests._states import states_for


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes at ZeRO 0 (one file per tag); can fail."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.step = 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False and tag.startswith(ck.TMP_PREFIX)
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.full((3,), float(self.step))}, **client_state},
                   Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        if self.fail_at == self.step:
            raise RuntimeError("disk full")


def cfg(*overrides):
    return load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", *overrides])


def save(cp, engine, step, c):
    engine.step = step
    meta = {"step": step, "world_size": 1, "config": to_dict(c), "config_hash": config_hash(c)}
    return cp.save(states_for(engine, meta, loader={"pos": step}))


def test_save_publishes_atomically_and_keeps_last_k(tmp_path):
    c = cfg()
    cp = ck.Checkpointer(tmp_path, rank=0, world_size=1, keep=2)
    for step in (10, 20, 30):
        path = save(cp, FakeEngine(), step, c)
        assert ck.read_latest(cp.dir) == path.name == ck.tag_for(step)
    assert ck.complete_tags(cp.dir) == ["step_00000020", "step_00000030"]
    assert not any(p.name.startswith(ck.TMP_PREFIX) for p in cp.dir.iterdir())
    files = sorted(p.name for p in (cp.dir / "step_00000030").iterdir())
    assert files == ["client_rank_00000.pt", "mohico_meta.json", "mp_rank_00_model_states.pt"]
    assert torch.load(cp.dir / "step_00000030" / "client_rank_00000.pt")["loader"] == {"pos": 30}


def test_interrupted_save_is_invisible_and_cleaned_up(tmp_path):
    c = cfg()
    cp = ck.Checkpointer(tmp_path, rank=0, world_size=1, keep=3)
    save(cp, FakeEngine(), 10, c)
    with pytest.raises(MohicoError, match="disk full"):    # a failed write: every rank raises, the
        save(cp, FakeEngine(fail_at=20), 20, c)              # partial folder is removed at once
    assert ck.read_latest(cp.dir) == "step_00000010"
    assert not (cp.dir / ".tmp-step_00000020").exists()
    assert pick_resume(cp, "auto", False) == (cp.dir, "step_00000010")
    (cp.dir / ".tmp-step_00000020").mkdir()                  # a crash (SIGKILL) during a save leaves it
    (cp.dir / ".tmp-step_00000020" / "client_rank_00000.pt").write_bytes(b"half")
    cp.remove_partial()
    assert not (cp.dir / ".tmp-step_00000020").exists()
    # a crash after the rename but before `latest` moved: the step is redone and replaced
    save(cp, FakeEngine(), 20, c)
    (cp.dir / ck.LATEST).write_text("step_00000010")
    save(cp, FakeEngine(), 20, c)
    assert ck.read_latest(cp.dir) == "step_00000020"


def test_find_resume_and_resolve(tmp_path):
    c = cfg()
    cp = ck.Checkpointer(tmp_path / "run", rank=0, world_size=1, keep=3)
    assert pick_resume(cp, "auto", False) is None and pick_resume(cp, "never", False) is None
    save(cp, FakeEngine(), 5, c)
    save(cp, FakeEngine(), 7, c)
    assert pick_resume(cp, "never", True) is None
    want = (cp.dir, "step_00000007")
    assert ck.resolve_checkpoint(tmp_path / "run") == want                  # run directory
    assert ck.resolve_checkpoint(cp.dir) == want                            # checkpoints directory
    assert ck.resolve_checkpoint(cp.dir / "step_00000005") == (cp.dir, "step_00000005")
    assert pick_resume(cp, str(cp.dir / "step_00000005"), False) == (cp.dir, "step_00000005")
    with pytest.raises(MohicoError, match="no checkpoint at"):
        ck.resolve_checkpoint(tmp_path / "empty")
    (cp.dir / ck.LATEST).write_text("step_00000009")       # points nowhere: the newest intact one
    assert pick_resume(cp, "auto", False) == want
    assert ck.read_latest(cp.dir) == "step_00000007"


def test_config_mismatch_is_refused_unless_forced(tmp_path):
    a = cfg("optim.lr=0.02")
    meta = {"config": to_dict(a), "config_hash": config_hash(a)}
    ck.check_config(meta, a, tmp_path, force=False)
    ck.check_config(meta, cfg("optim.lr=0.02", "run.dir=elsewhere", "checkpoint.keep=9"), tmp_path, force=False)
    with pytest.raises(MohicoError) as e:
        ck.check_config(meta, cfg("optim.lr=0.05"), tmp_path, force=False)
    msg = str(e.value)
    assert "optim.lr: 0.02 -> 0.05" in msg and "checkpoint.force=true" in msg and str(tmp_path) in msg
    assert "resume=never" not in msg      # it would overwrite the run's checkpoints
    assert e.value.exit_code == 2         # a config error (README: exit codes), not a runtime failure
    ck.check_config(meta, cfg("optim.lr=0.05"), tmp_path, force=True)      # warns, loads


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_meta_is_json_and_names_the_config(tmp_path):
    c = cfg("trainer.seed=7")
    cp = ck.Checkpointer(tmp_path, rank=0, world_size=1, keep=1)
    save(cp, FakeEngine(), 3, c)
    meta = json.loads((cp.dir / "step_00000003" / ck.META).read_text())
    assert meta["config"]["trainer"]["seed"] == 7 and meta["config_hash"] == config_hash(c)
    assert ck.read_meta(cp.dir, "step_00000003") == meta
