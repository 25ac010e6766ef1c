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
from _batches import make_batch
from _console import missing_from_line
from _dist import run_gloo


def cfg(*overrides):
    return load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", *overrides])


def test_batch_picture_frames_in_time_order_with_boxes_and_motion():
    T = 4
    clips = torch.zeros(1, 2, 3, T, 16, 16)
    for t in range(T):                                   # frame t of the clip has grey level 0.2 * (t + 1)
        clips[0, :, :, t] = (0.2 * (t + 1) - 0.5) / 0.25
    motion = torch.zeros(1, 2, T, 4, 4)
    motion[0, 1, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])   # view 1: hot top-left cell, rising
    boxes = torch.tensor([[[0.0, 0.0, 48.0, 48.0], [48.0, 48.0, 48.0, 48.0]]])   # extent 96 x 96
    frames = torch.tensor([[[10, 12, 14, 16], [9, 7, 5, 3]]])   # view 1's clip runs backwards in time
    flip = torch.tensor([[False, True]])
    batch = make_batch(clips, motion=motion, boxes=boxes, frames=frames, flip=flip)
    tile = 96
    img = batch_picture(batch, [0.5] * 3, [0.25] * 3, tile=tile)
    # rows: view 0 frames, view 0 motion, view 1 frames, view 1 motion, the T-motion plot
    assert img.shape == (5 * tile, T * tile, 3) and img.dtype == np.uint8
    green, red = wandb_log.COLOURS[0], wandb_log.COLOURS[1]
    for j in range(T):
        x = j * tile
        # view 0: tile j shows clip frame j (frames already in time order) inside its box, top-left quarter
        assert abs(int(img[30, x + 30, 0]) - round(255 * 0.2 * (j + 1))) <= 1
        assert (img[80, x + 80] == 64).all()                                  # outside the box: the frame's extent
        assert (img[0, x + 20] == green).all()                                # the box's top edge
        # view 1: time order = reversed clip order, so tile j shows clip frame T-1-j, in the lower-right box
        assert abs(int(img[2 * tile + 70, x + 70, 0]) - round(255 * 0.2 * (T - j))) <= 1
        assert (img[2 * tile + 48, x + 70] == red).all()
    # view 1's motion row: the hot cell is top-left of the *flipped* clip = top-right in the stored frame;
    # the first time-ordered tile is clip frame 3 (the strongest, 4.0: white), the last clip frame 0 (1.0)
    row = 3 * tile
    assert (img[row + 52, 92] == 255).all() and (img[row + 52, 52] == 0).all()
    assert img[row + 52, (T - 1) * tile + 92, 0] < 255
    # the T-motion plot has axis labels (text pixels left of the y axis and below the x axis)
    plot = img[4 * tile:]
    assert (plot[30:70, :40] > 200).any() and (plot[-12:, 100:300] > 200).any()


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
    logger.log_batch_images(make_batch(torch.zeros(1, 2, 3, 1, 4, 4)), 1, [0] * 3, [1] * 3)
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
    from mohico.trainer.step_metrics import reduce_metrics

    counters = {"skipped": 2.0} if rank == 0 else {"skipped": 1.0, "lost_on_restore": 3.0}   # ranks differ
    return reduce_metrics({"loss": 1.0 + rank, "mcl/nce": 4.0 * rank}, counters)


def test_reduce_metrics_over_ranks_with_different_counters():
    results = run_gloo(_metrics_worker, 2)
    want = {"loss": 1.5, "mcl/nce": 2.0, "data/skipped": 3.0, "data/lost_on_restore": 3.0}
    assert results[0] == want and results[1] == want


def _fraction_worker(rank, world):
    from mohico.trainer.step_metrics import reduce_metrics

    return reduce_metrics({"perf/data_wait_frac": 0.5 + 0.1 * rank}, {"data_wait_fraction": 0.6 + 0.2 * rank,
                                                                      "skipped": 1.0})


def test_fractions_are_averaged_over_ranks_not_summed():
    results = run_gloo(_fraction_worker, 2)
    want = {"perf/data_wait_frac": 0.55, "data/data_wait_fraction": 0.7, "data/skipped": 2.0}
    for r in results:
        assert r.keys() == want.keys() and all(r[k] == pytest.approx(v) for k, v in want.items())


class _FakeEngine:
    def __init__(self, module, norm=None):
        self.module, self.norm = module, norm

    def get_global_grad_norm(self):
        return self.norm


def test_step_health_grad_norm_nonfinite_and_time_between_steps():
    from mohico.trainer.step_metrics import StepHealth

    net = torch.nn.Linear(3, 2)
    net.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    net.bias.grad = torch.tensor([0.0, 12.0])
    zero0 = StepHealth(0)
    norm = zero0.norm_before_step(_FakeEngine(net))
    assert norm == pytest.approx(13.0, rel=1e-12)                    # sqrt(9 + 16 + 144)
    first = zero0.after_step(_FakeEngine(net), 1.5, 0.1, norm)
    assert first == {"lr": 0.1, "optim/nonfinite_steps": 0, "optim/grad_norm": pytest.approx(13.0)}
    second = zero0.after_step(_FakeEngine(net), float("nan"), 0.1, norm)
    assert second["optim/nonfinite_steps"] == 1 and second["perf/seconds_since_last_step"] >= 0
    # ZeRO 1/2: DeepSpeed's norm after the step; an infinite one counts as a non-finite step
    zero1 = StepHealth(1)
    assert zero1.norm_before_step(_FakeEngine(net)) is None
    assert zero1.after_step(_FakeEngine(net, 2.5), 1.0, 0.2)["optim/grad_norm"] == 2.5
    row = zero1.after_step(_FakeEngine(net, float("inf")), 1.0, 0.2)
    assert row["optim/nonfinite_steps"] == 1 and row["optim/grad_norm"] == float("inf")


def test_env_values_stay_out_of_the_offline_wandb_files(monkeypatch, tmp_path, caplog):
    """Issue 30 item 4: a token given through ``${oc.env:...}`` in W&B's tags, the run's name (W&B's
    name) or its project/entity is never written: W&B gets the expression, not the value."""
    token = "tok-3f9a61c2e7d4b508"
    monkeypatch.setenv("MY_TOKEN", token)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    c = cfg("wandb.mode=offline", 'wandb.tags=["${oc.env:MY_TOKEN}",plain]', "run.name=n-${oc.env:MY_TOKEN}",
            "wandb.entity=${oc.env:MY_TOKEN}")
    assert c.wandb.tags[0] == token                     # the config itself holds the value
    logger = WandbLogger(c, tmp_path, "abcd1234", rank=0, resumed=False)
    assert logger.run is not None, caplog.text
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".wandb") for p in files), files
    leaked = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert not leaked, f"the token is in {leaked}"
    assert any(b"${oc.env:MY_TOKEN}" in p.read_bytes() for p in files if p.name.endswith(".wandb"))
    assert "wandb.entity comes from ${oc.env:MY_TOKEN}" in caplog.text


def test_format_eta_and_window_summary():
    from mohico.trainer.metric_window import MetricWindow, format_eta

    assert [format_eta(s) for s in (0, 45.4, 192, 3723, float("nan"))] == ["0s", "45s", "3m12s", "1h02m03s", "?"]
    w = MetricWindow()
    w.add({"loss": 1.0, "lr": 0.1, "optim/nonfinite_steps": 0, "batch": object()})
    w.add({"loss": 2.0, "lr": 0.2, "optim/nonfinite_steps": 1, "knn/top1": 0.5})
    # the mean over the window; the last value for the learning rate and running counts; no pictures
    assert w.summary() == {"loss": 1.5, "lr": 0.2, "optim/nonfinite_steps": 1, "knn/top1": 0.5}
    assert w.summary() == {}


class _Run:
    """A W&B run that keeps what it is given: ``rows[step]`` merges every log call of that step."""

    def __init__(self, rows):
        self.rows, self.dir = rows, "."

    def log(self, metrics, step):
        self.rows.setdefault(step, {}).update(metrics)

    def finish(self, **kwargs):
        pass


def test_console_window_line_shows_every_metric_wandb_got_and_the_eta(monkeypatch, tmp_path, caplog):
    """Issue 28: every scalar W&B gets during a window is on that window's console line (means over
    the window, the last lr), ``loss`` goes to W&B every step like ``lr``, metrics.jsonl holds the
    same rows, the online kNN reaches the console, and the line ends in an ETA."""
    import json
    import logging
    import types

    import wandb

    from mohico.trainer import run_log as run_log_module
    from mohico.trainer.run_log import RunLog
    from mohico.trainer.train_step import StepResult

    monkeypatch.delenv("WANDB_MODE", raising=False)
    rows: dict[int, dict] = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: _Run(rows))
    clock = [1000.0]
    monkeypatch.setattr(run_log_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    c = cfg("wandb.mode=offline", "trainer.max_steps=4", "trainer.log_every=2", "wandb.image_every=0")
    (tmp_path / "logs").mkdir()

    class Loader:
        def stats(self):
            return {"skipped": 0, "bytes_read": 100}

    class Module:
        backbone = None

        def banks(self):
            return {}

    class Knn:          # the online kNN monitor, due at step 3 (between two windows)
        def due(self, step):
            return step == 3

        def run(self, backbone):
            return {"knn/top1": 0.25, "knn/top5": 0.75, "knn/time_s": 0.5}

    logger = WandbLogger(c, tmp_path, "abcd1234", rank=0, resumed=False)
    log = RunLog(c, tmp_path, 0, 1, "cpu", Loader(), logger, 0)
    log.monitor = Knn()
    caplog.set_level(logging.INFO, logger="mohico.trainer")
    for step in (1, 2, 3, 4):
        clock[0] += 10.0                                   # 10 s of wall time per step
        result = StepResult(float(step), {"loss": float(step), "mcl/loss": step / 2}, 12, 0.5, None)
        health = {"lr": 0.1 * step, "optim/grad_norm": 2.0 * step, "optim/nonfinite_steps": 0}
        log.step(step, result, 1.0, 0.1 * step, health, Module(), 0)
    log.close()
    # W&B: loss and lr at every step; the window's averages at 2 and 4 (its loss as window/loss)
    assert all({"loss", "lr", "optim/grad_norm"} <= rows[s].keys() for s in (1, 2, 3, 4))
    assert rows[2]["window/loss"] == 1.5 and rows[4]["window/loss"] == 3.5 and rows[3]["knn/top1"] == 0.25
    assert "window/loss" not in rows[1] and "knn/top1" not in rows[4]
    # metrics.jsonl: the same rows, with the step
    written = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r.pop("step") for r in written] == [1, 2, 3, 4] and written == [rows[s] for s in (1, 2, 3, 4)]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 3, lines
    first, knn_line, second = lines
    # the eta: 2 steps left at 10 s per step; none left at the end
    assert first.startswith("step 2/4 eta 20s ") and second.startswith("step 4/4 eta 0s ")
    assert knn_line.startswith("step 3/4 online kNN ") and "knn/top1=0.25" in knn_line
    assert missing_from_line(first, [rows[1], rows[2]]) == [] and missing_from_line(second, [rows[3], rows[4]]) == []
    # means over the window, the last learning rate
    assert " loss=1.5 " in first and " optim/grad_norm=3 " in first and " lr=0.2 " in first
    assert " loss=3.5 " in second and " lr=0.4 " in second and " knn/top1=0.25" in second


def test_config_text_is_the_saved_config_with_secrets_as_expressions(monkeypatch):
    import yaml

    from mohico.config import config_text, to_saved_dict

    monkeypatch.setenv("MY_TOKEN", "tok-5e1d")
    c = cfg("wandb.entity=${oc.env:MY_TOKEN}")
    text = config_text(c)
    assert "tok-5e1d" not in text and yaml.safe_load(text) == to_saved_dict(c)
    assert yaml.safe_load(text)["wandb"]["entity"] == "${oc.env:MY_TOKEN}"


def test_an_eval_is_a_wandb_run_of_its_own_in_the_run_group(monkeypatch, tmp_path):
    """Issue 28: an evaluation of a run's checkpoint gets its own W&B run (job type eval, grouped with
    the pretraining run, in RUN_DIR/wandb) rather than resuming the pretraining run."""
    import json

    import wandb

    from mohico.eval.report import log_wandb
    from mohico.trainer.wandb_log import run_opener

    monkeypatch.delenv("WANDB_MODE", raising=False)
    calls, rows = [], {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or _Run(rows))
    tag = tmp_path / "run" / "checkpoints" / "step_00000006"
    tag.mkdir(parents=True)
    (tag / "mohico_meta.json").write_text(json.dumps({"step": 6, "wandb_run_id": "pre12345"}))
    (tag.parent / "latest").write_text(tag.name)
    got = log_wandb({"protocol": "knn", "top1": 0.5}, tmp_path / "run", None, run_opener(cfg("wandb.mode=offline")))
    (kw,) = calls
    assert got == kw["id"] != "pre12345" and kw["group"] == "pre12345" and kw["job_type"] == "eval"
    assert kw["dir"] == str(tmp_path / "run") and kw["name"] == "run-eval-knn-step6"
    assert rows == {6: {"eval/knn/top1": 0.5}}
    # a fine-tune run's own test result goes into that run (its id, resumed), at its step
    calls.clear()
    assert log_wandb({"protocol": "finetune", "top1": 0.7}, tmp_path / "run", None,
                     run_opener(cfg("wandb.mode=offline")), into_run=True) == "pre12345"
    assert calls[0]["id"] == "pre12345" and calls[0]["group"] is None and calls[0]["job_type"] is None
    assert rows[6] == {"eval/knn/top1": 0.5, "eval/finetune/top1": 0.7}


def test_fused_grad_norm_is_deepspeeds_bitwise(monkeypatch):
    """Issue 31: the global gradient norm in one fused call equals DeepSpeed ZeRO's own
    per-parameter loop bit for bit, a non-finite gradient masked to -1 and no gradient 0 alike
    (one rank: the all-reduce over the ranks, the same call in both, is left out)."""
    import types

    from deepspeed import comm as ds_comm
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from mohico.trainer.grad_norm import fuse_grad_norm

    monkeypatch.setattr(ds_comm, "all_reduce", lambda tensor, **kwargs: tensor)
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 7, 7), (8,), (128, 64), (64,), (1,), (3, 5, 2)]
    grads = [torch.randn(s) * 10.0 ** (i % 5 - 3) for i, s in enumerate(shapes * 7)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    got = []
    for gs in (grads, [*grads[:-1], torch.full_like(grads[-1], float("inf"))], []):
        fake = types.SimpleNamespace(model_parallel_rank=0, model_parallel_group=None, dp_process_group=None,
                                     device=torch.device("cpu"), _model_parallel_all_reduce=lambda **kw: None)
        deepspeed_own = DeepSpeedZeroOptimizer.get_grad_norm_direct(fake, gs, params[:len(gs)])
        fake.get_grad_norm_direct = lambda *a, **k: None       # the fused form must not fall back here
        fuse_grad_norm(fake)
        got.append((deepspeed_own, fake.get_grad_norm_direct(gs, params[:len(gs)])))
    (a, b), (inf_a, inf_b), (none_a, none_b) = got
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b) and 0 < float(a) < float("inf")
    assert float(inf_a) == float(inf_b) == -1.0 and float(none_a) == float(none_b) == 0.0
