"""The training loop: read it top to bottom.

    rank, world = init_distributed()
    resume = find_resume(...)             # config hash checked; universal form at another world size
    module = PretrainModule(cfg)          # backbone + heads + objectives; forward returns the loss
    engine = DeepSpeed(module, torch optimizer, ZeRO 0/1/2)
    loader = build_loader(cfg, shards, rank, world)
    states = {"engine", "train", "rng", "loader", "banks"}   # trainer/states.py: what a checkpoint holds
    checkpointer.load(states, resume)
    while step < max_steps:
        lr = warm-up + cosine(step); loader.set_progress(progress)
        train_step(...)                    # grad_accum x (batch -> engine -> backward -> step); key encoder EMA
        run_log.step(...)                  # console, metrics.jsonl, W&B (trainer/run_log.py)
        checkpoint every N steps and at the end: checkpointer.save(states)
        preemption signal on any rank -> all save -> exit 3 (SLURM: requeue)

Failure behaviour (README "Failure behaviour"): rank 0 holds ``run.dir/.lock``; resume verifies
the checkpoint's sha256 digests and falls back past damaged ones (checkpoint/resume.py); a NaN/inf loss
skips the micro-step on every rank and stops after ``trainer.nonfinite_limit`` in a row (exit 4,
nonfinite); NaN weights are never saved; a watchdog ends a stalled loop (exit 5) and a signal
whose checkpoint cannot be reached within ``trainer.signal_grace_s`` (exit 6, watchdog).

Everything of a run lives under ``run.dir``: ``config.yaml``, ``checkpoints/``, ``logs/``
(``train_rank{r}.log``, ``metrics.jsonl``) and ``wandb/``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from mohico.trainer.batches import loader_report
from mohico.trainer.checkpoint.checkpointer import Checkpointer
from mohico.trainer.checkpoint.layout import tag_for
from mohico.trainer.checkpoint.resume import find_resume
from mohico.trainer.engine import build_engine, device_type, init_distributed, resolve_precision
from mohico.trainer.faults import Faults
from mohico.trainer.nonfinite import NonFiniteGuard
from mohico.trainer.liveness import AliveRecord
from mohico.trainer.optim import build_optimizer, set_lr
from mohico.trainer.peer_failure import failing_together, note_failure, peer_notes
from mohico.trainer.preemption import PREEMPTED_EXIT_CODE, Preemption, requeue
from mohico.trainer.rng import RngState, rank_seed, seed_everything
from mohico.trainer.run_lock import acquire_on_rank0
from mohico.trainer.run_log import RunLog
from mohico.trainer.states import BanksState, EngineState, TrainState
from mohico.trainer.step_metrics import StepHealth
from mohico.trainer.train_step import Batches, StepContext, train_step
from mohico.trainer.wandb_log import WandbLogger
from mohico.trainer.watchdog import Watchdog
from mohico.config import config_text, save_config
from mohico.datasets.load.pipeline import build_loader
from mohico.models.pretrain import PretrainModule, without_init

log = logging.getLogger("mohico.trainer")


def setup_determinism(cfg) -> None:
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"train_rank{rank}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s rank%(rank)s %(name)s] %(message)s".replace("%(rank)s", str(rank))))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if rank != 0:   # other ranks: warnings only on the console
        for h in root.handlers:
            if h is not handler and isinstance(h, logging.StreamHandler):
                h.setLevel(logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _default_module(cfg):
    if cfg.finetune.backbone:            # fine-tuning: backbone + new head on labelled clips
        from mohico.eval.finetune import FinetuneModule   # (the eval stack: imported only to fine-tune)

        return FinetuneModule(cfg)

    return PretrainModule(cfg)


def _default_loader(cfg, rank, world):
    return build_loader(cfg, cfg.data.shards, rank=rank, world_size=world)


def train(cfg, build_module=None, build_loader=None, faults: Faults | None = None) -> int:
    """Run (or resume) training for ``cfg``; returns 0, or PREEMPTED_EXIT_CODE after a
    preemption checkpoint. ``build_module(cfg)`` / ``build_loader(cfg, rank, world)`` default
    to PretrainModule and datasets.load.pipeline.build_loader; ``faults`` (tests) default to
    ``MOHICO_FAULT`` (:mod:`mohico.trainer.faults`)."""
    build_module = build_module or _default_module
    build_loader = build_loader or _default_loader
    setup_determinism(cfg)
    rank, world, local_rank = init_distributed(cfg.trainer.dist_timeout_s)
    device = torch.device("cuda", local_rank) if device_type() == "cuda" else torch.device("cpu")
    run_dir = Path(cfg.run.dir)
    faults = faults or Faults.from_env(rank)
    lock = acquire_on_rank0(run_dir, rank)          # one training per run.dir (names the holder)
    try:            # a failing rank leaves a note; a peer whose collective breaks names it in one line
        return failing_together(run_dir, rank, lambda: _train(cfg, build_module, build_loader, rank, world,
                                                              device, run_dir, faults))
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, build_module, build_loader, rank, world, device, run_dir, faults) -> int:
    setup_logging(run_dir, rank)
    log.info("run %s: %d rank(s), %s, ZeRO %d, %s, %s", run_dir, world, device_type(), cfg.trainer.zero_stage,
             resolve_precision(cfg), cfg.optim.name)
    # ---- where to resume from (decided before the engine: the universal form changes its config)
    ckpt = Checkpointer(run_dir, rank, world, cfg.checkpoint.keep, faults)
    train_state = TrainState(cfg, world)
    resume = find_resume(ckpt, cfg, train_state.data_fingerprint)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        log.info("config (resolved; environment values as their ${oc.env:...} expressions):\n%s",
                 config_text(cfg).rstrip())

    # ---- model, optimizer, engine (identical initial weights on every rank), data
    seed_everything(cfg.trainer.seed)
    module = build_module(without_init(cfg) if resume.found else cfg)   # model.init: a fresh run only
    optimizer = build_optimizer(cfg, module, partitioned=cfg.trainer.zero_stage >= 1)
    engine = build_engine(cfg, module, optimizer, world, load_universal=resume.universal)
    seed_everything(rank_seed(cfg.trainer.seed, rank))
    loader = build_loader(cfg, rank, world)

    # ---- every piece of resumable state (trainer/states.py); the checkpointer saves and loads them
    states = {"engine": EngineState(engine, cfg.trainer.zero_stage), "train": train_state,
              "rng": RngState(cfg.trainer.seed, rank), "loader": loader, "banks": BanksState(engine.module)}
    ckpt.load(states, resume)

    wandb = WandbLogger(cfg, run_dir, train_state.wandb_run_id, rank, resumed=resume.found)
    run_log = RunLog(cfg, run_dir, rank, world, device, loader, wandb, train_state.step)
    pre = Preemption().install()
    guard = NonFiniteGuard(cfg.trainer.nonfinite_limit)
    dog = start_watchdog(cfg, loader, run_dir, rank)
    ctx = StepContext(device, cfg.trainer.grad_accum, world, guard, StepHealth(cfg.trainer.zero_stage), dog)
    exit_code = 1
    try:
        batches, last_saved, save_due = Batches(loader), (train_state.step if resume.found else -1), False
        while train_state.step < cfg.trainer.max_steps:
            t_step, step = time.perf_counter(), train_state.step
            progress, lr = train_state.plan.progress(step), train_state.plan.lr(step, cfg, world)
            loader.set_progress(progress)
            set_lr(optimizer, lr)
            result = train_step(engine, batches, progress, ctx, step)
            train_state.step = step = step + 1
            health_row = ctx.health.after_step(engine, result.loss, lr, result.norm_before_step)
            faults.after_step(step)
            run_log.step(step, result, time.perf_counter() - t_step, lr, health_row, engine.module, guard.total)

            save_due = save_due or step % cfg.checkpoint.every_steps == 0 or step == cfg.trainer.max_steps
            if save_due and guard.last_bad:
                log.warning("step %d: checkpoint deferred (this step's loss was not finite)", step)
            elif save_due:
                save_checkpoint(ckpt, states, ctx)
                last_saved, save_due = step, False
            if pre.agreed(device):
                log.warning("preemption (%s): checkpointing at step %d and exiting with code %d",
                            pre.signal_name, step, PREEMPTED_EXIT_CODE)
                if last_saved != step and not guard.last_bad:
                    save_checkpoint(ckpt, states, ctx)
                requeue(rank)
                exit_code = PREEMPTED_EXIT_CODE
                return exit_code
        log.info("done: %d steps; checkpoint %s", train_state.step, ckpt.dir / tag_for(train_state.step))
        exit_code = 0
        return 0
    finally:        # every step runs even if one before it raises: a skipped loader close leaves the rank hanging
        run_all(dog.stop, pre.uninstall, run_log.close,
                lambda: wandb.finish(exit_code=0 if exit_code in (0, PREEMPTED_EXIT_CODE) else exit_code),
                getattr(loader, "close", None))


def save_checkpoint(ckpt: Checkpointer, states: dict, ctx: StepContext) -> None:
    """Save ``states`` (collective); NaN/inf weights are never saved (every rank stops instead)."""
    step = states["train"].step
    ctx.guard.check_weights(states["engine"].engine.module, step, ctx.device)
    ctx.dog.beat(f"checkpoint step {step} to be written by every rank", collective=True)
    t0 = time.perf_counter()
    path = ckpt.save(states)
    log.info("checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
    ctx.dog.beat()


def start_watchdog(cfg, loader, run_dir: Path, rank: int) -> Watchdog:
    """The stall/signal watchdog (trainer/watchdog.py): names the loader's state and failed peers."""
    return Watchdog(cfg.trainer.stall_timeout_s, cfg.trainer.signal_grace_s,
                    lambda: loader_report(loader) + peer_notes(run_dir, rank),
                    probe=getattr(loader, "dead_workers", None),
                    on_die=lambda reason: note_failure(run_dir, rank, reason),
                    liveness=AliveRecord(run_dir, rank)).start()     # peers can name this rank if it is killed


def run_all(*steps) -> None:
    """Call each of ``steps`` (None entries skipped) in order, even after one raises; then raise
    the first error, if any."""
    first: BaseException | None = None
    for fn in steps:
        if not callable(fn):
            continue
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            log.exception("cleanup step %s failed", getattr(fn, "__qualname__", fn))
            first = first or e
    if first is not None:
        raise first
