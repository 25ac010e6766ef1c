"""Resume that lets you train longer: what the config hash guards, which changes a resume allows
(and logs), the shards compared by manifest checksum, and the lr/progress schedule re-planned
from the resume step when trainer.max_steps changes (float64 references)."""
from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from mohico.config import config_hash, load_config, to_dict
from mohico.errors import MohicoError
from mohico.trainer import checkpoint as ck
from mohico.trainer.optim import SchedulePlan, lr_at
from mohico.trainer.checkpoint.config_check import data_fingerprint


def cfg(*overrides):
    return load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", *overrides])


def meta_for(c, step=40, **extra):
    return {"step": step, "config": to_dict(c), "config_hash": config_hash(c), **extra}


def test_hash_ignores_what_does_not_change_the_trajectory():
    a = cfg()
    for same in ("trainer.max_steps=5000", "data.num_workers=9", "data.shards=/elsewhere", "wandb.image_every=7",
                 "checkpoint.every_steps=3", "trainer.log_every=1", "slurm.nodes=4", "run.dir=x"):
        assert config_hash(cfg(same)) == config_hash(a), same
    for other in ("optim.lr=0.5", "data.batch_size=3", "trainer.steps_per_epoch=7", "sampling.delta=2.0"):
        assert config_hash(cfg(other)) != config_hash(a), other


def test_allowed_changes_resume_and_are_logged(tmp_path, caplog):
    a = cfg("trainer.max_steps=100")
    b = cfg("trainer.max_steps=300", "data.num_workers=7", "checkpoint.every_steps=9", "wandb.mode=disabled",
            "trainer.log_every=3")
    with caplog.at_level(logging.INFO, logger="mohico.trainer"):
        allowed = ck.check_config(meta_for(a), b, tmp_path, force=False)
    keys = {d.split(":")[0] for d in allowed}
    assert {"trainer.max_steps", "data.num_workers", "checkpoint.every_steps", "wandb.mode", "trainer.log_every"} <= keys
    assert "trainer.max_steps: 100 -> 300 (lr schedule and progress re-planned from step 40)" in caplog.text
    # anything else still refuses, with the diff and the fix
    with pytest.raises(MohicoError) as e:
        ck.check_config(meta_for(a), cfg("trainer.max_steps=300", "optim.lr=0.5"), tmp_path, force=False)
    assert "optim.lr: 0.02 -> 0.5" in str(e.value) and "checkpoint.force=true" in str(e.value)
    assert "max_steps" not in str(e.value)


def test_saved_config_from_an_older_schema_still_compares(tmp_path):
    a = cfg()
    saved = to_dict(a)
    del saved["data"]["shuffle_buffer"]          # a key added after the checkpoint was written (at its default)
    ck.check_config({"step": 1, "config": saved, "config_hash": "oldhash"}, a, tmp_path, force=False)


def _shards(folder, names=("shard-000000.tar", "shard-000001.tar"), size=10):
    folder.mkdir(parents=True)
    entries = []
    for i, n in enumerate(names):
        (folder / n).write_bytes(b"x" * size)
        entries.append({"name": n, "bytes": size, "samples": [f"key{i}"]})
    (folder / "manifest.json").write_text(json.dumps({"format": "mohico-shards/1", "shards": entries}))
    return folder


def test_moved_shards_with_the_same_manifest_resume(tmp_path):
    old = _shards(tmp_path / "old")
    new = tmp_path / "new"
    shutil.copytree(old, new)
    fp_old, fp_new = data_fingerprint(str(old)), data_fingerprint(str(new))
    assert fp_old == fp_new and fp_old is not None
    a, b = cfg(f"data.shards={old}"), cfg(f"data.shards={new}")
    allowed = ck.check_config(meta_for(a, data_fingerprint=fp_old), b, tmp_path, force=False, data_fp=fp_new)
    assert any(d.startswith("data.shards:") and "same shards" in d for d in allowed)
    # other content under the new path: refused, and the message says why
    other = _shards(tmp_path / "other", names=("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"))
    with pytest.raises(MohicoError, match=r"data\.shards: .*content differs"):
        ck.check_config(meta_for(a, data_fingerprint=fp_old), cfg(f"data.shards={other}"), tmp_path, force=False,
                        data_fp=data_fingerprint(str(other)))
    # no manifest checksum in the checkpoint (or none for the new path): a moved path is refused
    with pytest.raises(MohicoError, match="no manifest.json checksum"):
        ck.check_config(meta_for(a), b, tmp_path, force=False, data_fp=fp_new)


def test_fingerprint_depends_on_content_not_path(tmp_path):
    a = _shards(tmp_path / "a")
    b = _shards(tmp_path / "b", size=11)
    assert data_fingerprint(str(a)) != data_fingerprint(str(b))
    assert data_fingerprint(str(a / "shard-000000.tar")) != data_fingerprint(str(a))
    assert data_fingerprint("") is None and data_fingerprint(str(tmp_path / "missing")) is None


def _cosine_ref(step, s0, lr0, floor, end):
    return floor + (lr0 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - s0) / (end - s0))))


def test_extending_max_steps_replans_lr_and_progress_from_the_resume_step():
    over = ["optim.lr=0.1", "optim.warmup_epochs=1", "trainer.steps_per_epoch=10", "optim.min_lr=0.001"]
    a, b = cfg(*over, "trainer.max_steps=50"), cfg(*over, "trainer.max_steps=100")
    plan_a = SchedulePlan.resume(None, a, 1)
    assert [plan_a.lr(s, a, 1) for s in range(51)] == [lr_at(s, a, 1) for s in range(51)]
    assert plan_a.progress(20) == pytest.approx(0.4)
    meta = meta_for(a, step=30, schedule=plan_a.state_dict())
    plan_b = SchedulePlan.resume(meta, b, 1)
    lr30 = lr_at(30, a, 1)                                        # the old schedule's value at the resume step
    assert plan_b.lr(30, b, 1) == pytest.approx(lr30, rel=1e-12)
    for s in range(30, 101):
        assert plan_b.lr(s, b, 1) == pytest.approx(_cosine_ref(s, 30, lr30, 0.001, 100), rel=1e-12)
    assert plan_b.lr(100, b, 1) == pytest.approx(0.001)
    assert plan_b.progress(30) == pytest.approx(0.6) and plan_b.progress(100) == 1.0
    assert plan_b.progress(65) == pytest.approx(0.6 + 0.4 * 35 / 70)
    # a second extension composes with the first (the plan travels in the checkpoint meta)
    c = cfg(*over, "trainer.max_steps=200")
    plan_c = SchedulePlan.resume(meta_for(b, step=80, schedule=plan_b.state_dict()), c, 1)
    assert plan_c.lr(80, c, 1) == pytest.approx(plan_b.lr(80, b, 1), rel=1e-12)
    assert plan_c.progress(80) == pytest.approx(plan_b.progress(80))
    assert plan_c.lr(200, c, 1) == pytest.approx(0.001)
    # same max_steps: the saved plan is kept as is; a checkpoint without a plan is a plan from step 0
    assert SchedulePlan.resume(meta_for(b, step=90, schedule=plan_b.state_dict()), b, 1).state_dict() == plan_b.state_dict()
    assert SchedulePlan.resume(meta_for(a, step=30), a, 1).state_dict() == plan_a.state_dict()


def test_extending_during_warmup_keeps_the_warmup():
    over = ["optim.lr=0.1", "optim.warmup_epochs=2", "trainer.steps_per_epoch=10"]
    a, b = cfg(*over, "trainer.max_steps=50"), cfg(*over, "trainer.max_steps=80")
    plan = SchedulePlan.resume(meta_for(a, step=5), b, 1)
    assert [plan.lr(s, b, 1) for s in range(81)] == [lr_at(s, b, 1) for s in range(81)]
    assert plan.progress(5) == pytest.approx(0.1)


@pytest.mark.parametrize("old_max,new_max,step", [(30, 200, 20), (200, 48, 40), (60, 45, 30)])
def test_resuming_inside_a_warmup_cut_short_follows_the_cosine(old_max, new_max, step):
    """A warm-up of 50 steps that one of the two max_steps cuts short (the old run's 30; the new
    one's 48 or 45): the lr continues from the old schedule's value at the resume step along the
    cosine to min_lr at the new end (README), no warm-up restarted or continued (issue 30)."""
    over = ["optim.lr=0.1", "optim.warmup_epochs=5", "trainer.steps_per_epoch=10", "optim.min_lr=0.001",
            "optim.warmup_start_factor=0.01"]
    a, b = cfg(*over, f"trainer.max_steps={old_max}"), cfg(*over, f"trainer.max_steps={new_max}")
    w_old = min(50, old_max)
    lr0 = 0.1 * (0.01 + 0.99 * step / w_old) if step < w_old else None      # float64 reference, old schedule
    if lr0 is None:
        lr0 = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * (step - w_old) / (old_max - w_old)))
    assert lr_at(step, a, 1) == pytest.approx(lr0, rel=1e-12)
    plan = SchedulePlan.resume(meta_for(a, step=step), b, 1)
    for s in range(step, new_max + 1):
        assert plan.lr(s, b, 1) == pytest.approx(_cosine_ref(s, step, lr0, 0.001, new_max), rel=1e-12), s
    assert all(plan.lr(s + 1, b, 1) <= plan.lr(s, b, 1) for s in range(step, new_max))   # never warms up again
    # a further change composes: continuous at its resume step
    c = cfg(*over, f"trainer.max_steps={new_max + 100}")
    plan_c = SchedulePlan.resume(meta_for(b, step=step + 5, schedule=plan.state_dict()), c, 1)
    assert plan_c.lr(step + 5, c, 1) == pytest.approx(plan.lr(step + 5, b, 1), rel=1e-12)


def test_extending_a_finished_run_says_it_trains_at_min_lr_and_rewarm_restarts_the_cosine(caplog):
    """Issue 28 item 3: a finished run's extra steps train at optim.min_lr (the schedule had ended):
    the log line says so with the lr; optim.rewarm=true (resume-safe) restarts the cosine from the peak."""
    import logging

    from mohico.config import config_hash
    from mohico.trainer.optim import base_lr
    from mohico.trainer.states import TrainState

    a = cfg("trainer.max_steps=100", "optim.warmup_epochs=0")
    b = cfg("trainer.max_steps=200", "optim.warmup_epochs=0")
    finished = meta_for(a, step=100)
    with caplog.at_level(logging.INFO, logger="mohico.trainer"):
        state = TrainState(b, 1)
        state.load_state_dict(finished)
    assert state.plan.lr(150, b, 1) == pytest.approx(b.optim.min_lr)
    assert "trainer.max_steps -> 200: steps 100..200 train at lr 1e-06" in caplog.text
    assert "the run had finished" in caplog.text and "optim.rewarm=true" in caplog.text
    caplog.clear()

    r = cfg("trainer.max_steps=200", "optim.warmup_epochs=0", "optim.rewarm=true")
    assert config_hash(r) == config_hash(b)                     # resume-safe: given with the new max_steps
    with caplog.at_level(logging.INFO, logger="mohico.trainer"):
        state = TrainState(r, 1)
        state.load_state_dict(finished)
    peak = base_lr(r, 1)
    assert state.plan.lr(100, r, 1) == pytest.approx(peak)
    assert state.plan.lr(150, r, 1) == pytest.approx(r.optim.min_lr + (peak - r.optim.min_lr) * 0.5)
    assert state.plan.lr(200, r, 1) == pytest.approx(r.optim.min_lr)
    assert "optim.rewarm=true: the cosine restarted" in caplog.text and "had finished" not in caplog.text
