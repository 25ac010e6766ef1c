"""What each training step reports, and where.

    run_log = RunLog(cfg, run_dir, rank, world, device, loader, wandb, start_step)
    run_log.step(step, result, lr, health_row, module, nonfinite_total)   # after optimizer step ``step``
    run_log.close()

- every step: W&B gets ``lr``, ``optim/*`` and ``perf/seconds_since_last_step``
  (:class:`~mohico.trainer.step_metrics.StepHealth`); rank 0's ``logs/metrics.jsonl`` gets a row
  (``loss`` = this step's loss on rank 0); a terminal shows a tqdm bar.
- every ``trainer.log_every`` steps and at the last one (a *window*): the objective terms averaged
  and the loader counters summed over the ranks (:func:`~mohico.trainer.step_metrics.reduce_metrics`,
  collective), step time, clips/s, data wait, memory, bank fill, storage reads
  (:class:`~mohico.trainer.io_meter.IOMeter`) to W&B and metrics.jsonl (W&B's window ``loss`` is
  ``window/loss`` there), and a console line when there is no bar.
- every ``eval.every_steps`` (rank 0): the online kNN monitor (fine-tuning: validation top-1), to W&B,
  metrics.jsonl and a console line; every ``wandb.image_every``: a batch picture.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from mohico.trainer.batches import skip_counts
from mohico.trainer.io_meter import IOMeter
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

    def step(self, step: int, result: StepResult, seconds: float, lr: float, health_row: dict, module,
             nonfinite_total: int) -> None:
        """Report optimizer step ``step`` (1-based count of steps done) that took ``seconds``."""
        cfg, t = self.cfg, self.cfg.trainer
        self.time, self.wait, self.steps = self.time + seconds, self.wait + result.wait_s, self.steps + 1
        self.clips += result.clips
        for k, v in result.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.wandb.log(health_row, step=step)     # every step: lr, grad norm, non-finite steps, seconds since the last
        row = {"step": step, "loss": result.loss, **health_row}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        if step % t.log_every == 0 or step == t.max_steps:
            window = self._window_row(step, lr, module, nonfinite_total)
            # metrics.jsonl keeps "loss" = this step's loss on rank 0; W&B's "loss" (the mean over the
            # window and the ranks) is "window/loss" there, every other key is W&B's.
            row.update({("window/loss" if k == "loss" else k): v for k, v in window.items()})
        if self.monitor is not None and self.monitor.due(step):      # no state or RNG touched
            eval_row = self.monitor.run(module)
            self.wandb.log(eval_row, step=step)
            row.update(eval_row)
            log.info("step %d/%d %s", step, t.max_steps, " ".join(f"{k}={v:.4g}" for k, v in eval_row.items()))
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if cfg.wandb.image_every > 0 and step % cfg.wandb.image_every == 0:
            self.wandb.log_batch_images(result.batch, step, cfg.data.mean, cfg.data.std)

    def _window_row(self, step: int, lr: float, module, nonfinite_total: int) -> dict:
        """The window's averages over the ranks (collective), logged to W&B and the console."""
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
        self.wandb.log(row, step=step)
        if self.bar is None:
            shown = " ".join(f"{k}={v:.4g}" for k, v in avg.items() if k == "loss" or k.endswith("/loss"))
            log.info("step %d/%d %s lr=%.3g %.2f s/step %.1f clips/s wait=%.0f%% mem=%.0f MB%s",
                     step, t.max_steps, shown, lr, row["perf/step_time_s"], row["perf/clips_per_s"],
                     100 * row["perf/data_wait_frac"], row["perf/memory_mb"], skip_counts(row))
        self._new_window()
        return row

    def close(self) -> None:
        for thing in (self.bar, self.file):
            if thing is not None:
                thing.close()
