"""What each training step reports, and where.

    run_log = RunLog(cfg, run_dir, rank, world, device, loader, wandb, start_step)
    run_log.step(step, result, lr, health_row, module, nonfinite_total)   # after optimizer step ``step``
    run_log.close()

One row per step goes to W&B and, with ``"step"`` added, to rank 0's ``logs/metrics.jsonl``: the
same keys at the same steps in both.

- every step: ``loss`` (this step's loss on rank 0), ``lr``, ``optim/*`` and
  ``perf/seconds_since_last_step`` (:class:`~mohico.trainer.step_metrics.StepHealth`); a terminal
  shows a tqdm bar.
- every ``trainer.log_every`` steps and at the last one (a *window*): the objective terms averaged
  over the window and the ranks (the loss as ``window/loss``) and the loader counters summed over the
  ranks (:func:`~mohico.trainer.step_metrics.reduce_metrics`, collective), step time, clips/s, data
  wait, memory, bank fill, storage reads (:class:`~mohico.trainer.io_meter.IOMeter`).
- every ``eval.every_steps`` (rank 0): the online kNN monitor (``knn/*``; fine-tuning: validation
  top-1, ``finetune/val_*``); every ``wandb.image_every``: a batch picture.
- the console, at each window: ``step N/MAX eta 3m12s`` (remaining steps at the window's measured
  steps/s), the step time, clips/s, data wait and memory, then every other scalar W&B got during the
  window (:class:`~mohico.trainer.metric_window.MetricWindow`: the mean over the window, the last
  value for the learning rate and running counts). An online evaluation between windows also gets a line of its own.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from mohico.trainer.io_meter import IOMeter
from mohico.trainer.metric_window import format_eta, format_metrics
from mohico.trainer.step_metrics import bank_fills, memory_mb, reduce_metrics
from mohico.trainer.train_step import StepResult

log = logging.getLogger("mohico.trainer")


def periodic_eval(cfg, device):
    """Rank 0's evaluation every ``eval.every_steps``: the fine-tuned module's validation top-1
    (``finetune/val_*``) in a fine-tuning run, else the online kNN of the backbone (``knn/*``). The
    eval stack is imported only here. A fine-tuning run without held-out shards (``eval.val_shards``,
    ``finetune.test_shards``) has none, like its final test."""
    if cfg.finetune.backbone and not (cfg.eval.val_shards or cfg.finetune.test_shards):
        log.info("no validation top-1: no held-out shards (finetune.test_shards or eval.val_shards)")
        return None
    from mohico.trainer.online_knn import FinetuneVal, OnlineKnn

    return (FinetuneVal if cfg.finetune.backbone else OnlineKnn)(cfg, device)


class RunLog:
    def __init__(self, cfg, run_dir: Path, rank: int, world: int, device, loader, wandb, start_step: int):
        self.cfg, self.rank, self.world, self.loader, self.wandb = cfg, rank, world, loader, wandb
        self.monitor = periodic_eval(cfg, device) if rank == 0 and cfg.eval.every_steps > 0 else None
        self.io_meter = IOMeter(rank, loader.stats() if hasattr(loader, "stats") else None)
        self.file = open(Path(run_dir) / "logs" / "metrics.jsonl", "a") if rank == 0 else None
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.trainer.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self._new_window()

    def _new_window(self) -> None:
        self.time, self.wait, self.steps, self.clips = 0.0, 0.0, 0, 0
        self.terms: dict[str, float] = {}
        self.window_start = time.perf_counter()

    def step(self, step: int, result: StepResult, seconds: float, lr: float, health_row: dict, module,
             nonfinite_total: int) -> None:
        """Report optimizer step ``step`` (1-based count of steps done) that took ``seconds``."""
        cfg, t = self.cfg, self.cfg.trainer
        self.time, self.wait, self.steps = self.time + seconds, self.wait + result.wait_s, self.steps + 1
        self.clips += result.clips
        for k, v in result.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        row = {"loss": result.loss, **health_row}     # every step: loss, lr, grad norm, non-finite steps, timing
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        window = step % t.log_every == 0 or step == t.max_steps
        if window:   # the mean over the window and the ranks of the loss is "window/loss"
            row.update({("window/loss" if k == "loss" else k): v
                        for k, v in self._window_row(step, lr, module, nonfinite_total).items()})
        eval_row = None
        if self.monitor is not None and self.monitor.due(step):      # online kNN / validation: no state or RNG touched
            eval_row = self.monitor.run(module)
            row.update(eval_row)
        self.wandb.log(row, step=step)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
            self.file.flush()
        if window:
            self._console(step, row)
        elif eval_row is not None and self.rank == 0:
            what = "online kNN" if any(k.startswith("knn/") for k in eval_row) else "validation"
            self._print("step %d/%d %s %s", step, t.max_steps, what, format_metrics(eval_row))
        if cfg.wandb.image_every > 0 and step % cfg.wandb.image_every == 0:
            self.wandb.log_batch_images(result.batch, step, cfg.data.mean, cfg.data.std)

    def _window_row(self, step: int, lr: float, module, nonfinite_total: int) -> dict:
        """The window's averages over the ranks (collective); starts the next window."""
        n, t = self.steps, self.cfg.trainer
        counters = {k: float(v) for k, v in (self.loader.stats() or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
        counters.update(self.io_meter.window(counters, self.clips / self.world, self.time))
        wait_frac = self.wait / max(self.time, 1e-9)
        avg = reduce_metrics({**{k: v / n for k, v in self.terms.items() if not k.endswith("/bank_fill")},
                              "perf/data_wait_frac": wait_frac}, counters)   # one fill key per bank: below
        row = {**avg, "lr": lr, "epoch": step / t.steps_per_epoch,
               "optim/nonfinite_skipped": nonfinite_total,
               "perf/step_time_s": self.time / n,
               "perf/clips_per_s": self.clips / max(self.time, 1e-9),
               "perf/memory_mb": memory_mb(), **bank_fills(module),
               **self.io_meter.totals(avg, self.clips, self.time)}
        self.eta_s = (t.max_steps - step) * (time.perf_counter() - self.window_start) / n   # wall time per step
        self._new_window()
        return row

    def _console(self, step: int, row: dict) -> None:
        """Rank 0's window line: the headline, then every other scalar W&B got in the window."""
        seen = self.wandb.window.summary()
        if self.rank != 0:
            return
        headline = {"perf/step_time_s", "perf/clips_per_s", "perf/data_wait_frac", "perf/memory_mb"}
        losses = {k: v for k, v in seen.items() if k == "loss" or k.endswith("/loss")}
        rest = {k: v for k, v in seen.items() if k not in headline and k not in losses}
        self._print("step %d/%d eta %s %s %.2f s/step %.1f clips/s wait=%.0f%% mem=%.0f MB | %s",
                    step, self.cfg.trainer.max_steps, format_eta(self.eta_s), format_metrics(losses),
                    row["perf/step_time_s"], row["perf/clips_per_s"], 100 * row["perf/data_wait_frac"],
                    row["perf/memory_mb"], format_metrics(rest))

    def _print(self, fmt: str, *args) -> None:
        """A console (and train_rank0.log) line; with a tqdm bar, written above it."""
        if self.bar is None:
            log.info(fmt, *args)
        else:
            with self.bar.external_write_mode():
                log.info(fmt, *args)

    def close(self) -> None:
        for thing in (self.bar, self.file):
            if thing is not None:
                thing.close()
