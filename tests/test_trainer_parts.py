"""Trainer parts without DeepSpeed: W&B logging that never stops training, the batch picture,
preemption signals and SLURM requeue."""
from __future__ import annotations

import os
import signal
import stat

import numpy as np
import pytest
import torch

from mohico.config import load_config
from mohico.trainer import preemption, wandb_log
from mohico.trainer.wandb_log import WandbLogger, batch_picture, resolve_mode
from _dist import run_gloo


def cfg(*overrides):
    return load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", *overrides])


def test_batch_picture_draws_views_boxes_and_motion():
    clips = torch.zeros(1, 2, 3, 4, 16, 16)           # normalised zeros -> the mean colour
    motion = torch.zeros(1, 2, 4, 4, 4)
    motion[0, 1, 2, 0, 0] = 1.0                         # view 1, middle frame: hot top-left cell
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 50.0], [50.0, 50.0, 50.0, 50.0]]])
    img = batch_picture({"clips": clips, "motion": motion, "boxes": boxes}, [0.5] * 3, [0.2] * 3, tile=64)
    assert img.shape == (64, 5 * 64, 3) and img.dtype == np.uint8
    green, red = wandb_log.COLOURS[0], wandb_log.COLOURS[1]
    assert (img[0, 5] == green).all() and (img[40, 63] == red).all()          # box borders on the canvas
    assert (img[20, 20] == 127).all()                                         # view 0 pasted in its box (0.5 * 255)
    assert (img[0, 64 + 10] == green).all() and (img[10, 3 * 64] == red).all()
    hot = img[:, 4 * 64:]                                                     # view 1's motion map
    assert (hot[:16, :16] == 255).all() and (hot[32:, 32:] == 0).all()


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))         # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"


def test_wandb_failures_never_stop_training(monkeypatch, tmp_path, caplog):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)

    def broken_init(**kwargs):
        raise RuntimeError("network down")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = WandbLogger(cfg("wandb.mode=offline"), tmp_path, "abcd1234", rank=0, resumed=False)
    assert logger.run is None
    logger.log({"loss": 1.0}, step=1)
    logger.log_batch_images({"clips": torch.zeros(1, 2, 3, 1, 4, 4)}, 1, [0] * 3, [1] * 3)
    logger.finish()
    assert sum("network down" in r.message for r in caplog.records) == 1

    class FlakyRun:
        dir = str(tmp_path)

        def log(self, *a, **k):
            raise OSError("disk full")

        def finish(self, **k):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    caplog.clear()
    logger = WandbLogger(cfg("wandb.mode=offline"), tmp_path, "abcd1234", rank=0, resumed=False)
    for step in range(3):
        logger.log({"loss": 1.0}, step=step)
    assert logger.run is None and sum("disk full" in r.message for r in caplog.records) == 1


def test_wandb_only_on_rank0_and_disabled(monkeypatch, tmp_path):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    WandbLogger(cfg(), tmp_path, "abcd1234", rank=1, resumed=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    WandbLogger(cfg(), tmp_path, "abcd1234", rank=0, resumed=False)
    assert calls == []
    monkeypatch.setenv("WANDB_MODE", "offline")
    WandbLogger(cfg(), tmp_path, "abcd1234", rank=0, resumed=True)
    assert calls[0]["id"] == "abcd1234" and calls[0]["resume"] == "allow" and calls[0]["mode"] == "offline"
    assert calls[0]["dir"] == str(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag(sig):
    pre = preemption.Preemption().install()
    try:
        assert not pre.agreed()
        os.kill(os.getpid(), sig)
        assert pre.flag and pre.agreed() and pre.signal_name == signal.Signals(sig).name
    finally:
        pre.uninstall()
    assert signal.getsignal(sig) is not pre._handler


def test_requeue_under_slurm(monkeypatch, tmp_path):
    log = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("MOHICO_REQUEUE_BY", raising=False)
    assert not preemption.requeue(0)                      # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert not preemption.requeue(1)                      # only rank 0 requeues
    assert preemption.requeue(0)
    assert log.read_text().split() == ["requeue", "4242"]
    monkeypatch.setenv("MOHICO_REQUEUE_BY", "sbatch")      # slurm/pretrain.sbatch requeues itself
    assert not preemption.requeue(0)
    assert log.read_text().split() == ["requeue", "4242"]  # no second call
    assert preemption.PREEMPTED_EXIT_CODE == 3


def _metrics_worker(rank, world):
    from mohico.trainer.train import reduce_metrics

    counters = {"skipped": 2.0} if rank == 0 else {"skipped": 1.0, "lost_on_restore": 3.0}   # ranks differ
    return reduce_metrics({"loss": 1.0 + rank, "mcl/nce": 4.0 * rank}, counters)


def test_reduce_metrics_over_ranks_with_different_counters():
    results = run_gloo(_metrics_worker, 2)
    want = {"loss": 1.5, "mcl/nce": 2.0, "data/skipped": 3.0, "data/lost_on_restore": 3.0}
    assert results[0] == want and results[1] == want
