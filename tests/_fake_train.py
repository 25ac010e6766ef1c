"""The real training loop (``mohico.trainer.train.train``, DeepSpeed, gloo) around a tiny fake
module and loader, so trainer failure paths run in seconds.

    codes = run_fake_train(tmp_path / "run", world=2, overrides=["optim.lr=1e9"])

Each rank is a ``spawn`` process (tests/_dist.py); it returns ``("rc", code)`` or
``("error", type name, message)`` for a raised exception.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import torch
from torch import nn

from tests._batches import make_batch

BASE = ["objectives.mcl.weight=1", "model.backbone=r3d_18", "trainer.max_steps=4", "checkpoint.every_steps=2",
        "checkpoint.keep=2", "trainer.log_every=2", "wandb.mode=disabled", "trainer.zero_stage=1",
        "optim.warmup_epochs=0", "data.batch_size=2"]


class FakeModule(nn.Module):
    """loss = mean((w . x - 1)^2) on a (B, 4) batch; no bank. ``FAKE_NAN_AT=N`` (env) makes the
    loss NaN from the N-th forward on, on rank ``FAKE_NAN_RANK`` only (default: every rank)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.calls = 0

    def forward(self, clips, motion, progress, video_id=None):
        self.calls += 1
        x = clips.reshape(clips.shape[0], -1)[:, :4]
        loss = ((self.lin(x) - 1.0) ** 2).mean()
        nan_at = int(os.environ.get("FAKE_NAN_AT", "0"))
        nan_rank = os.environ.get("FAKE_NAN_RANK", os.environ["RANK"])
        if nan_at and self.calls >= nan_at and nan_rank == os.environ["RANK"]:
            loss = loss * float("nan")
        return loss, {"fake/loss": loss.detach()}

    def momentum_update(self):
        pass

    def banks(self):
        return {}


class FakeLoader:
    """Endless random (B, 2, 3, 1, 2, 2) clips; a counter as its state. ``FAKE_STALL_AT=N``: the
    N-th batch of rank ``FAKE_STALL_RANK`` (default 0) never comes (after sending this process
    SIGTERM first if ``FAKE_SIGNAL_SELF=1``), like a loader whose workers hang. ``FAKE_KILL_AT=N``:
    rank ``FAKE_KILL_RANK`` (default 1) writes ``{"pid", "time"}`` to ``$FAKE_KILL_FILE`` and
    SIGKILLs itself before its N-th batch, like the OOM killer. ``FAKE_STALL_FILE``: written when the
    stall begins (a test waits on it). ``FAKE_SIGNAL_AT=N``: rank ``FAKE_SIGNAL_RANK`` (default 0)
    sends itself SIGUSR1 before its N-th batch and goes on (a pre-emption at a step boundary)."""

    def __init__(self, cfg, rank, world):
        self.rank, self.n = rank, 0
        self.B = cfg.data.batch_size

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == int(os.environ.get("FAKE_KILL_AT", "0")) and str(self.rank) == os.environ.get("FAKE_KILL_RANK", "1"):
            with open(os.environ["FAKE_KILL_FILE"], "w") as f:
                json.dump({"pid": os.getpid(), "time": time.time()}, f)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.n == int(os.environ.get("FAKE_SIGNAL_AT", "0")) and str(self.rank) == os.environ.get("FAKE_SIGNAL_RANK", "0"):
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.n == int(os.environ.get("FAKE_STALL_AT", "0")) and str(self.rank) == os.environ.get("FAKE_STALL_RANK", "0"):
            if os.environ.get("FAKE_STALL_FILE"):
                with open(os.environ["FAKE_STALL_FILE"], "w") as f:
                    f.write(str(os.getpid()))
            if os.environ.get("FAKE_SIGNAL_SELF") == "1":
                os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait()          # forever
        g = torch.Generator().manual_seed(self.n * 10 + self.rank)
        return make_batch(torch.randn(self.B, 2, 3, 1, 2, 2, generator=g))

    def set_progress(self, p):
        pass

    def stats(self):
        return {"skipped": 3, "bad_json": 3}

    def last_error(self):
        return "shard-000.tar:clip7: metadata json missing"

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def _rank_main(rank, world, run_dir, overrides, env):
    from mohico.config import load_config
    from mohico.errors import MohicoError
    from mohico.trainer.train import train

    os.environ.update({"WANDB_MODE": "disabled", **env})
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cfg = load_config(None, [*BASE, f"run.dir={run_dir}", *overrides])
    try:
        return ("rc", train(cfg, build_module=lambda c: FakeModule(), build_loader=FakeLoader))
    except MohicoError as e:
        return ("error", type(e).__name__, str(e), e.exit_code)


def run_fake_train(run_dir, world: int = 1, overrides=(), env=None, timeout: float = 120.0) -> list:
    from tests._dist import run_gloo

    return run_gloo(_rank_main, world=world, args=(str(run_dir), list(overrides), dict(env or {})), timeout=timeout)
