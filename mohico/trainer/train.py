"""The training loop: read it top to bottom.

    rank, world = init_distributed()
    resume? -> check the config hash, pick the checkpoint (universal form at another world size)
    module = PretrainModule(cfg)            # backbone + heads + objectives; forward returns the loss
    engine = DeepSpeed(module, torch optimizer, ZeRO 0/1/2)
    loader = build_loader(cfg, shards, rank, world)
    restore: engine (weights, optimizer), loader state, bank shard, RNG states, W&B run id
    for step in [start, max_steps):
        lr = warm-up + cosine(step); loader.set_progress(step / max_steps)
        grad_accum x (batch -> engine(clips, motion, progress, video_id) -> backward -> engine.step())
        module.momentum_update()            # key encoder EMA (the bank is filled in forward)
        log (rank 0: console, metrics.jsonl, W&B); checkpoint every N steps and at the end
        preemption signal on any rank -> all save -> exit 3 (SLURM: requeue)

Failure behaviour (README "Failure behaviour"): rank 0 holds ``run.dir/.lock``; resume verifies
the checkpoint's sha256 digests and falls back past damaged ones (ckpt_resume); a NaN/inf loss
skips the micro-step on every rank and stops after ``trainer.nonfinite_limit`` in a row (exit 4,
nonfinite); NaN weights are never saved; a watchdog ends a stalled loop (exit 5) and a signal
whose checkpoint cannot be reached within ``trainer.signal_grace_s`` (exit 6, watchdog).

Everything of a run lives under ``run.dir``: ``config.yaml``, ``checkpoints/``, ``logs/``
(``train_rank{r}.log``, ``metrics.jsonl``) and ``wandb/``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mohico import dist
from mohico.trainer import checkpoint as ck
from mohico.trainer.ckpt_resume import pick_resume
from mohico.trainer.batches import loader_report, next_batch, skip_counts
from mohico.trainer.engine import build_engine, device_type, init_distributed, resolve_precision
from mohico.trainer.io_meter import IOMeter
from mohico.trainer.online_knn import OnlineKnn
from mohico.trainer.optim import SchedulePlan, build_optimizer, set_lr
from mohico.trainer.resume_check import data_fingerprint
from mohico.trainer.step_metrics import StepHealth, mean_over_ranks
from mohico.trainer.nonfinite import NonFiniteGuard
from mohico.trainer.liveness import AliveRecord
from mohico.trainer.peer_failure import failing_together, note_failure, peer_notes
from mohico.trainer.preemption import PREEMPTED_EXIT_CODE, Preemption, requeue
from mohico.trainer.run_lock import acquire_on_rank0
from mohico.trainer.watchdog import Watchdog
from mohico.trainer.wandb_log import WandbLogger, new_run_id

log = logging.getLogger("mohico.trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Per-rank seed (fixed for a fresh run; mixed with the step after a world-size change)."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % 2 ** 63


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


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _default_module(cfg):
    if cfg.finetune.backbone:            # fine-tuning: backbone + new head on labelled clips
        from mohico.trainer.finetune import FinetuneModule

        return FinetuneModule(cfg)
    from mohico.models.pretrain import PretrainModule

    return PretrainModule(cfg)


def _default_loader(cfg, rank, world):
    from mohico.datasets.load.pipeline import build_loader

    return build_loader(cfg, cfg.data.shards, rank=rank, world_size=world)


def reduce_metrics(terms: dict[str, float], counters: dict[str, float]) -> dict[str, float]:
    """Objective terms averaged and loader counters summed over the ranks (collective; fractions
    such as ``data_wait_fraction`` are averaged: ``step_metrics.mean_over_ranks``). Key sets
    may differ between ranks (a counter appears once something happened), so the dicts are
    gathered as objects rather than reduced as aligned tensors."""
    parts = dist.all_gather_object((terms, counters))
    out: dict[str, float] = {}
    for key in sorted({k for t, _ in parts for k in t}):
        values = [t[key] for t, _ in parts if key in t]
        out[key] = sum(values) / len(values)
    for key in sorted({k for _, c in parts for k in c}):
        values = [c[key] for _, c in parts if key in c]
        out[f"data/{key}"] = sum(values) / len(values) if mean_over_ranks(key) else sum(values)
    return out


def bank_fills(module) -> dict[str, float]:
    """``{"bank/<objective>_fill": fraction}`` for each memory bank of the module."""
    banks = module.banks() if hasattr(module, "banks") else {}
    return {f"bank/{name}_fill": float(bank.fill) for name, bank in banks.items()}


def reshard_bank_states(module, states: list, world: int, rank: int):
    """This rank's bank state at ``world`` ranks from every old rank's ``bank_state_dict()``."""
    reshard = getattr(type(module), "reshard_bank_states", None)
    if reshard is not None:
        return reshard(states, world)[rank]
    return ck.reshard_bank(states, world, rank)


def train(cfg, build_module=None, build_loader=None) -> int:
    """Run (or resume) training for ``cfg``; returns 0, or PREEMPTED_EXIT_CODE after a
    preemption checkpoint. ``build_module(cfg)`` / ``build_loader(cfg, rank, world)`` default
    to PretrainModule and datasets.load.pipeline.build_loader."""
    build_module = build_module or _default_module
    build_loader = build_loader or _default_loader
    setup_determinism(cfg)
    rank, world, local_rank = init_distributed(cfg.trainer.dist_timeout_s)
    device = torch.device("cuda", local_rank) if device_type() == "cuda" else torch.device("cpu")
    run_dir = Path(cfg.run.dir)
    lock = acquire_on_rank0(run_dir, rank)          # one training per run.dir (names the holder)
    try:            # a failing rank leaves a note; a peer whose collective breaks names it in one line
        return failing_together(run_dir, rank, lambda: _train(cfg, build_module, build_loader, rank, world,
                                                              device, run_dir))
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, build_module, build_loader, rank, world, device, run_dir) -> int:
    from mohico.config import config_hash, save_config, to_saved_dict

    setup_logging(run_dir, rank)
    log.info("run %s: %d rank(s), %s, ZeRO %d, %s, %s", run_dir, world, device_type(), cfg.trainer.zero_stage,
             resolve_precision(cfg), cfg.optim.name)

    # ---- where to resume from (decided before the engine: the universal form changes its config)
    ckpt = ck.Checkpointer(run_dir, rank, world, cfg.checkpoint.keep)
    ckpt.remove_partial()
    source = pick_resume(ckpt, cfg.checkpoint.resume, cfg.checkpoint.force)
    meta = None
    data_fp = data_fingerprint(cfg.data.shards)
    if source is not None:
        meta = ck.read_meta(*source)
        ck.check_config(meta, cfg, source[0] / source[1], cfg.checkpoint.force, data_fp=data_fp)
    plan = SchedulePlan.resume(meta, cfg, world)   # re-planned from the resume step if max_steps changed
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    same_world = meta is None or meta["world_size"] == world
    universal = meta is not None and not same_world and meta.get("zero_stage", 0) >= 1

    # ---- model, optimizer, engine (identical initial weights on every rank)
    seed_everything(cfg.trainer.seed)
    module = build_module(cfg)
    optimizer = build_optimizer(cfg, module, partitioned=cfg.trainer.zero_stage >= 1)
    load_dir, load_tag = ckpt.universal(*source) if universal else (source or (None, None))
    engine = build_engine(cfg, module, optimizer, world, load_universal=universal)
    seed_everything(rank_seed(cfg.trainer.seed, rank))
    loader_cfg = cfg
    if not same_world:   # old per-rank loader states do not map to new ranks: a fresh stream per step
        loader_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(
            cfg.trainer, seed=(cfg.trainer.seed * 1_000_003 + int(meta["step"])) % 2 ** 31))
    loader = build_loader(loader_cfg, rank, world)

    step, run_id = 0, new_run_id()
    if source is not None:
        module_only = meta.get("zero_stage") != cfg.trainer.zero_stage
        if module_only:
            log.warning("checkpoint was written at ZeRO %s, this run uses ZeRO %d: loading the weights only "
                        "(optimizer state starts fresh)", meta.get("zero_stage"), cfg.trainer.zero_stage)
        path, _ = engine.load_checkpoint(str(load_dir), load_tag, load_module_only=module_only,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise ck.MohicoError(f"DeepSpeed could not load checkpoint {load_dir / load_tag}")
        states = ck.load_rank_states(source[0], source[1], meta["world_size"])
        step = int(meta["step"])
        if source[0].resolve() == ckpt.dir.resolve():   # this run's own checkpoint: same W&B run
            run_id = meta.get("wandb_run_id") or run_id
        if same_world:
            mine = states[rank]
            loader.load_state_dict(mine["loader"])
            engine.module.load_bank_state_dict(mine["bank"])
            ck.set_rng_state(mine["rng"])
        else:
            log.warning("resuming a %d-rank checkpoint on %d ranks: bank resharded; the data stream and RNG "
                        "streams restart from step-dependent seeds (not bitwise-continuous)", meta["world_size"], world)
            engine.module.load_bank_state_dict(reshard_bank_states(engine.module, [s["bank"] for s in states], world, rank))
            seed_everything(rank_seed(cfg.trainer.seed, rank, step))
        log.info("resumed from %s at step %d", source[0] / source[1], step)

    wandb = WandbLogger(cfg, run_dir, run_id, rank, resumed=source is not None)
    monitor = OnlineKnn(cfg, device) if rank == 0 and cfg.eval.every_steps > 0 else None   # eval.every_steps
    io_meter = IOMeter(rank, loader.stats() if hasattr(loader, "stats") else None)
    pre = Preemption().install()
    guard = NonFiniteGuard(cfg.trainer.nonfinite_limit)
    dog = Watchdog(cfg.trainer.stall_timeout_s, cfg.trainer.signal_grace_s,
                   lambda: loader_report(loader) + peer_notes(run_dir, rank),
                   probe=getattr(loader, "dead_workers", None),
                   on_die=lambda reason: note_failure(run_dir, rank, reason),
                   liveness=AliveRecord(run_dir, rank)).start()     # peers can name this rank if it is killed
    metrics_file = open(run_dir / "logs" / "metrics.jsonl", "a") if rank == 0 else None
    bar = None
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.trainer.max_steps, initial=step, desc="train", dynamic_ncols=True)

    def save(at_step: int) -> None:
        guard.check_weights(engine.module, at_step, device)      # NaN/inf weights are never saved
        dog.beat(f"checkpoint step {at_step} to be written by every rank", collective=True)
        meta_out = {"step": at_step, "epoch": at_step // cfg.trainer.steps_per_epoch,
                    "progress": plan.progress(at_step), "schedule": plan.state_dict(),
                    "data_fingerprint": data_fp, "world_size": world,
                    "zero_stage": cfg.trainer.zero_stage, "wandb_run_id": run_id,
                    "config_hash": config_hash(cfg), "config": to_saved_dict(cfg), "time": time.time()}
        rank_state = {"rank": rank, "loader": loader.state_dict(), "bank": engine.module.bank_state_dict(),
                      "rng": ck.rng_state()}
        t0 = time.perf_counter()
        path = ckpt.save(engine, at_step, meta_out, rank_state)
        log.info("checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
        dog.beat()

    exit_code = 1
    try:
        data = iter(loader)
        window = {"time": 0.0, "wait": 0.0, "steps": 0, "clips": 0}
        terms_sum: dict[str, float] = {}
        last_saved = step if source is not None else -1
        health = StepHealth(cfg.trainer.zero_stage)
        save_due = False
        while step < cfg.trainer.max_steps:
            progress = plan.progress(step)
            loader.set_progress(progress)
            lr = plan.lr(step, cfg, world)
            set_lr(optimizer, lr)
            t_step = time.perf_counter()
            wait, loss_sum, n_ok, norm0 = 0.0, 0.0, 0, None
            for micro in range(cfg.trainer.grad_accum):
                t_wait = time.perf_counter()
                rng = ck.rng_state(cuda=False)  # the loader (e.g. starting its workers) must not move
                data, batch = next_batch(data, loader)   # the training RNG streams: a resumed run restarts it
                ck.set_rng_state(rng)
                dog.beat("the forward/backward pass and its collectives", collective=True)
                wait += time.perf_counter() - t_wait
                clips = batch["clips"].to(device, non_blocking=True)
                motion = batch["motion"].to(device, non_blocking=True)
                video_id = batch.get("video_id")   # own-video clips and bank keys are not negatives
                if video_id is not None:
                    video_id = video_id.to(device, non_blocking=True)
                loss, terms = engine(clips, motion, progress, video_id=video_id)
                if not guard.finite(loss, device):   # NaN/inf on any rank: every rank skips it
                    guard.skipped(step)
                    continue
                engine.backward(loss)
                norm0 = health.norm_before_step(engine) if micro == cfg.trainer.grad_accum - 1 else None
                engine.step()
                n_ok += 1
                # one device-to-host transfer for the loss and every term (not one sync per term)
                host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                                    for v in (loss.detach(), *terms.values())]).tolist()
                loss_sum += host[0]
                for k, v in zip(terms, host[1:]):
                    terms_sum[k] = terms_sum.get(k, 0.0) + v / cfg.trainer.grad_accum
                window["clips"] += clips.shape[0] * clips.shape[1] * world
            dog.beat()
            with torch.no_grad():
                engine.module.momentum_update()
            step += 1
            dt = time.perf_counter() - t_step
            window["time"] += dt
            window["wait"] += wait
            window["steps"] += 1
            step_loss = loss_sum / n_ok if n_ok else float("nan")
            step_row = health.after_step(engine, step_loss, lr, norm0)
            wandb.log(step_row, step=step)     # every step: lr, grad norm, non-finite steps, seconds since the last
            metrics_row = {"step": step, "loss": step_loss, **step_row}
            ck._fault_point("step", step, rank)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics_row['loss']:.4f}", lr=f"{lr:.2e}")

            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                n = window["steps"]
                counters = {k: float(v) for k, v in (loader.stats() or {}).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}
                counters.update(io_meter.window(counters, window["clips"] / world, window["time"]))
                wait_frac = window["wait"] / max(window["time"], 1e-9)
                avg = reduce_metrics({**{k: v / n for k, v in terms_sum.items() if not k.endswith("/bank_fill")},
                                      "perf/data_wait_frac": wait_frac}, counters)   # one fill key per bank: below
                row = {**avg, "lr": lr, "epoch": step / cfg.trainer.steps_per_epoch,
                       "optim/nonfinite_skipped": guard.total,
                       "perf/step_time_s": window["time"] / n,
                       "perf/clips_per_s": window["clips"] / max(window["time"], 1e-9),
                       "perf/memory_mb": memory_mb(), **bank_fills(engine.module),
                       **io_meter.totals(avg, window["clips"], window["time"])}
                wandb.log(row, step=step)
                # metrics.jsonl keeps "loss" = this step's loss on rank 0; W&B's "loss" (the mean over the
                # window and the ranks) is "window/loss" there, every other key is W&B's.
                metrics_row.update({("window/loss" if k == "loss" else k): v for k, v in row.items()})
                if bar is None:
                    shown = " ".join(f"{k}={v:.4g}" for k, v in avg.items()
                                     if k == "loss" or k.endswith("/loss"))      # all terms go to W&B
                    log.info("step %d/%d %s lr=%.3g %.2f s/step %.1f clips/s wait=%.0f%% mem=%.0f MB%s",
                             step, cfg.trainer.max_steps, shown, lr, row["perf/step_time_s"],
                             row["perf/clips_per_s"], 100 * row["perf/data_wait_frac"], row["perf/memory_mb"],
                             skip_counts(row))
                window = {"time": 0.0, "wait": 0.0, "steps": 0, "clips": 0}
                terms_sum = {}
            if monitor is not None and monitor.due(step):      # online kNN: no state or RNG touched
                knn_row = monitor.run(engine.module.backbone)
                wandb.log(knn_row, step=step)
                metrics_row.update(knn_row)
            if metrics_file is not None:
                metrics_file.write(json.dumps(metrics_row) + "\n")
                metrics_file.flush()
            if cfg.wandb.image_every > 0 and step % cfg.wandb.image_every == 0:
                wandb.log_batch_images(batch, step, cfg.data.mean, cfg.data.std)

            save_due = save_due or step % cfg.checkpoint.every_steps == 0 or step == cfg.trainer.max_steps
            if save_due and guard.last_bad:
                log.warning("step %d: checkpoint deferred (this step's loss was not finite)", step)
            elif save_due:
                save(step)
                last_saved, save_due = step, False
            if pre.agreed(device):
                log.warning("preemption (%s): checkpointing at step %d and exiting with code %d",
                            pre.signal_name, step, PREEMPTED_EXIT_CODE)
                if last_saved != step and not guard.last_bad:
                    save(step)
                requeue(rank)
                exit_code = PREEMPTED_EXIT_CODE
                return exit_code
        log.info("done: %d steps; checkpoint %s", step, ckpt.dir / ck.tag_for(step))
        exit_code = 0
        return 0
    finally:        # every step runs even if one before it raises: a skipped loader close leaves the rank hanging
        run_all(dog.stop, pre.uninstall, getattr(bar, "close", None), getattr(metrics_file, "close", None),
                lambda: wandb.finish(exit_code=0 if exit_code in (0, PREEMPTED_EXIT_CODE) else exit_code),
                getattr(loader, "close", None))


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
