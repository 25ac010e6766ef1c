"""Weights & Biases logging from rank 0 that never stops training.

- Mode: :func:`mohico.trainer.wandb_mode.resolve_mode`: ``wandb.mode=auto`` is online with an API
  key (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai) and offline without one; the
  environment's ``WANDB_MODE`` (e.g. ``disabled``) wins over the config. Files go to ``run.dir/wandb/``.
- Resume: the run id lives in the checkpoint (the train state); a resumed run calls
  ``wandb.init(id=..., resume="allow")`` and logs with explicit ``step=`` so the curves continue.
  Offline, W&B writes each process's session to a folder of its own (``offline-run-<time>-<id>``:
  it never reopens a folder, ``wandb.init`` adds a suffix rather than reuse one), so every attempt of
  a run lies in ``run.dir/wandb/`` under the same id, and ``wandb sync run.dir/wandb/offline-run-*``
  uploads them in time order into one run.
- Evaluations (:mod:`mohico.eval.report`) are runs of their own (``job_type="eval"``, grouped
  with the pretraining run): W&B drops what a resumed run logs at a step below its last one, so the
  results of an earlier checkpoint could not go into the pretraining run itself. A fine-tune run's
  own test result (at its last step) goes into that run.
- Any W&B exception is caught: a warning is logged once and logging is switched off.
- Secrets: a value set through ``${oc.env:...}`` never reaches W&B (:mod:`mohico.config_secrets`):
  the config, the tags and the run's name carry the expression instead; ``wandb.project`` and
  ``wandb.entity`` from the environment are not passed at all (W&B then reads ``WANDB_PROJECT`` /
  ``WANDB_ENTITY`` itself), with a warning.
"""
from __future__ import annotations

import logging
import os
import secrets
import string
import threading
from pathlib import Path

from mohico.config import to_saved_dict
from mohico.config_secrets import env_sourced
from mohico.datasets.load.batch import ClipBatch
from mohico.trainer.batch_picture import COLOURS, batch_picture  # noqa: F401 - the picture lives there
from mohico.trainer.wandb_mode import resolve_mode
from mohico.trainer.metric_window import MetricWindow

log = logging.getLogger("mohico.trainer")


def new_run_id() -> str:
    """An 8-character run id (W&B's own alphabet)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLogger:
    """Rank 0's W&B run. On other ranks, or when disabled or broken, every method is a no-op."""

    def __init__(self, cfg, run_dir: str | os.PathLike, run_id: str, rank: int, resumed: bool,
                 name: str | None = None, group: str | None = None, job_type: str | None = None):
        self.run = None
        self.run_id = run_id
        self.mode = resolve_mode(cfg.wandb.mode)
        self._warned = False
        self.window = MetricWindow()    # every scalar logged since the console's last summary (run_log)
        if rank != 0 or self.mode == "disabled":
            return
        try:
            import wandb

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            saved = to_saved_dict(cfg)          # ${oc.env:...} values replaced by their expressions
            ids = {}
            for key in ("project", "entity"):
                if env_sourced(cfg, f"wandb.{key}"):
                    log.warning("wandb.%s comes from %s: not passed to W&B (values from the environment stay "
                                "out of what a run writes); set WANDB_%s instead, which W&B reads itself",
                                key, saved["wandb"][key], key.upper())
                    ids[key] = None
                else:
                    ids[key] = getattr(cfg.wandb, key) or None
            self.run = wandb.init(project=ids["project"], entity=ids["entity"],
                                  name=name or saved["run"]["name"] or Path(run_dir).resolve().name, id=run_id,
                                  resume="allow", dir=str(run_dir), mode=self.mode, group=group, job_type=job_type,
                                  config=saved, tags=list(saved["wandb"]["tags"]) or None,
                                  settings=wandb.Settings(console="off", silent=True))
            log.info("W&B %s run %s (%s)%s", self.mode, run_id, self.run_dir or run_dir,
                     ", resumed" if resumed else "")
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self._fail(e)

    @property
    def run_dir(self) -> str | None:
        try:
            return self.run.dir if self.run is not None else None
        except Exception:  # noqa: BLE001
            return None

    def _fail(self, e: Exception) -> None:
        if not self._warned:
            log.warning("W&B failed (%s: %s); training continues without W&B logging", type(e).__name__, e)
            self._warned = True
        self.run = None

    def log(self, metrics: dict, step: int) -> None:
        """Log ``metrics`` at ``step``; the scalars also go to :attr:`window` (on every rank, W&B on or off)."""
        self.window.add(metrics)
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log_batch_images(self, batch: ClipBatch, step: int, mean, std, max_samples: int = 2) -> None:
        """A picture of the batch (:mod:`mohico.trainer.batch_picture`): per sample and view its
        frames in time order with the crop box drawn where it lies in the frame, the motion maps,
        and a T-motion plot; captioned with the boxes and frame indices."""
        if self.run is None:
            return
        try:
            import wandb

            img = batch_picture(batch, mean, std, max_samples)
            caption = "; ".join(
                f"{batch.key[b]} view {v}: box "
                f"{[round(float(x), 1) for x in batch.boxes[b, v]]} frames "
                f"{batch.frames[b, v].tolist()[:1]}..{batch.frames[b, v].tolist()[-1:]}"
                for b in range(min(max_samples, batch.clips.shape[0])) for v in range(batch.clips.shape[1]))
            self.run.log({"batch": wandb.Image(img, caption=caption[:1000])}, step=step)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def finish(self, exit_code: int = 0, timeout: float = 120.0) -> None:
        """Close the run; gives up (with a warning) after ``timeout`` s so a stuck W&B service
        cannot keep a finished job alive."""
        if self.run is None:
            return
        run, self.run = self.run, None
        errors: list[Exception] = []

        def close():
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=close, name="wandb-finish", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            log.warning("W&B did not finish within %.0f s; leaving it (offline files may be incomplete)", timeout)
        elif errors:
            self.run = run
            self._fail(errors[0])


def run_opener(cfg):
    """``open_run(run_dir, run_id, resumed, name=, group=, job_type=) -> WandbLogger`` on rank 0 for
    :func:`mohico.eval.report.log_wandb`: run ``run_id`` (a new id when None), resumed or not."""
    return lambda run_dir, run_id, resumed, **kw: WandbLogger(cfg, run_dir, run_id or new_run_id(), rank=0,
                                                              resumed=resumed, **kw)
