"""Reporting an evaluation: a table on stdout, a JSON file, and W&B.

W&B: every evaluation is a run of its own (``job_type="eval"``). When the checkpoint is a run
directory (or one of its checkpoints) whose checkpoint meta records a ``wandb_run_id``, the run is in
that run's group (``group=<its id>``), named ``<run>-eval-<protocol>-step<N>``, kept in ``RUN_DIR/wandb``
and logged at the checkpoint's step (not into the pretraining run itself: W&B drops what a resumed run
logs at a step below its last, e.g. an earlier checkpoint's results); otherwise it is kept in the output
file's folder, at step 0. A fine-tune run's own test (:mod:`mohico.eval.finetune`) goes into that run, at
its last step (``into_run``). Keys are ``eval/<protocol>/<metric>``. The caller opens the run
(``open_run``, e.g. :func:`mohico.trainer.wandb_log.run_opener`: mode from ``wandb.mode`` /
``WANDB_MODE`` like training, offline without an API key; failures only warn), so evaluation never
imports the trainer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from mohico.checkpoint_read import read_meta, resolve_checkpoint
from mohico.utils import atomic_write_bytes

SCALARS_HIDDEN = ("per_video", "search", "ks")


def scalar_metrics(results: dict) -> dict[str, float]:
    """The numeric top-level entries of ``results`` (no bools, no lists)."""
    return {k: float(v) for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SCALARS_HIDDEN}


def format_table(title: str, rows: list[tuple[str, str]]) -> str:
    """A two-column text table under ``title``."""
    width = max([len(a) for a, _ in rows] + [6])
    vwidth = max([len(b) for _, b in rows] + [5])
    line = "-" * (width + vwidth + 3)
    body = "\n".join(f"{a:<{width}} | {b:>{vwidth}}" for a, b in rows)
    return f"{title}\n{line}\n{'metric':<{width}} | {'value':>{vwidth}}\n{line}\n{body}\n{line}"


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def results_table(results: dict) -> str:
    """The protocol's headline metrics (percentages for accuracies/recalls) and settings."""
    rows = []
    for k, v in results.items():
        if k in SCALARS_HIDDEN or isinstance(v, (list, dict)):
            continue
        if isinstance(v, float) and (k.startswith(("top", "recall@", "chance", "val_top")) or k.endswith("top1")):
            rows.append((k, f"{100 * v:.2f}%"))
        else:
            rows.append((k, _fmt(v)))
    table = format_table(f"mohico eval {results.get('protocol', '')}", rows)
    if results.get("search"):
        table += "\n" + format_table("learning-rate / weight-decay search (held-out train, video top-1)",
                                     [(f"lr={_fmt(r['lr'])} wd={_fmt(r['weight_decay'])}", f"{100 * r['val_top1']:.2f}%")
                                      for r in results["search"]])
    return table


def write_results(results: dict, path) -> Path:
    return atomic_write_bytes(path, (json.dumps(results, indent=2, default=str) + "\n").encode())


def pretraining_run(ckpt) -> Optional[tuple[Path, str, int]]:
    """``(run_dir, wandb_run_id, step)`` when ``ckpt`` is a mohico run (or one of its checkpoints)."""
    try:
        ckdir, tag = resolve_checkpoint(ckpt)
        meta = read_meta(ckdir, tag)
    except Exception:  # noqa: BLE001 - any other checkpoint form has no run
        return None
    run_id = meta.get("wandb_run_id")
    if not run_id:
        return None
    return Path(ckdir).parent, str(run_id), int(meta.get("step", 0))


def log_wandb(results: dict, ckpt, out: Optional[str], open_run: Callable, into_run: bool = False) -> Optional[str]:
    """Log ``results``' scalars to a new W&B eval run (in the pretraining run's group when ``ckpt`` is
    a run); ``into_run``: into the run of ``ckpt`` itself (a fine-tune run's own test, at its last
    step). ``open_run(run_dir, run_id, resumed, name=, group=, job_type=)`` opens the run (``run_id``
    None: a new id) and returns a logger with ``run`` (None when W&B is off or failed), ``run_id``,
    ``log(metrics, step)`` and ``finish()``. Returns the id of the W&B run logged to."""
    protocol = results.get("protocol", "eval")
    found = pretraining_run(ckpt)
    run_id, name, group, job_type = None, None, None, "eval"
    if found is not None and into_run:
        run_dir, run_id, step = found
        job_type = None
    elif found is not None:
        run_dir, group, step = found
        name = f"{run_dir.resolve().name}-eval-{protocol}-step{step}"
    else:
        run_dir = Path(out).resolve().parent if out else Path.cwd()
        step = 0
    logger = open_run(run_dir, run_id, into_run and found is not None, name=name, group=group, job_type=job_type)
    if logger.run is None:
        return None
    logger.log({f"eval/{protocol}/{k}": v for k, v in scalar_metrics(results).items()}, step=step)
    logger.finish()
    return logger.run_id
