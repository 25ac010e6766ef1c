"""May this config resume that checkpoint? The config hash guards only what changes the trajectory.

    check_config(meta, cfg, where, force, data_fp=data_fingerprint(cfg.data.shards))

Allowed, and logged, when resuming (``mohico.config.RESUME_SAFE_KEYS``): ``run.*``,
``wandb.*``, ``slurm.*``, ``checkpoint.*``, ``trainer.log_every``, ``trainer.nproc``,
``data.num_workers`` (the loader streams are re-split), ``trainer.max_steps`` (the lr schedule
and the training progress are re-planned from the current step: ``optim.SchedulePlan``) and
``data.shards`` when the shards' content is the same: their ``manifest.json`` entries (name,
size, sample keys), not their path. Any other difference refuses the resume with the diff and
the fix (``checkpoint.force=true`` loads anyway).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mohico.errors import ConfigError
from mohico.config import config_from_dict, config_hash, is_resume_safe, to_dict, trajectory_dict
from mohico.datasets.shard_list import expand_shards

log = logging.getLogger("mohico.trainer")


def config_difference(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as 'key: saved -> current'."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_difference(a, b, dotted + "."))
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def data_fingerprint(shards) -> str | None:
    """A checksum of the shards' content from their folders' ``manifest.json`` (each shard's
    name, size in bytes and sample keys), independent of where the folder lies; shards without
    a manifest entry count by their URL. ``None`` if ``shards`` is empty or cannot be expanded."""
    if not shards:
        return None

    try:
        urls = expand_shards(shards, allow_commands=True)     # listed only, never opened
    except Exception:  # noqa: BLE001 - a missing folder: nothing to compare
        return None
    manifests: dict[Path, dict] = {}
    items = []
    for url in urls:
        folder = Path(url).parent
        if folder not in manifests:
            try:
                man = json.loads((folder / "manifest.json").read_text())
                manifests[folder] = {s["name"]: s for s in man.get("shards", [])}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                manifests[folder] = {}
        entry = manifests[folder].get(Path(url).name)
        if entry is None:
            items.append(["url", url])
        else:
            items.append([entry["name"], entry.get("bytes"), entry.get("samples")])
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def _normalised(saved: dict) -> dict:
    """The saved config with keys added since (at their defaults), when it still loads."""

    try:
        return to_dict(config_from_dict(saved, "checkpoint config"))
    except Exception:  # noqa: BLE001 - an older schema: compare as saved
        return saved


def check_config(meta: dict, cfg, where: Path, force: bool, data_fp: str | None = None) -> list[str]:
    """Refuse to resume a checkpoint written under a config that changes the trajectory (unless
    ``force``); log the allowed changes and return them (``'key: saved -> current'``).
    ``data_fp``: :func:`data_fingerprint` of ``cfg.data.shards``, compared with the checkpoint's."""

    current = to_dict(cfg)
    if "config" not in meta:   # no saved config to compare: the hash decides
        refused = [] if meta.get("config_hash") == config_hash(cfg) else ["settings differ"]
        allowed: list[str] = []
    else:
        saved = _normalised(meta["config"])
        refused = config_difference(trajectory_dict(saved), trajectory_dict(current))
        allowed = [d for d in config_difference(saved, current) if is_resume_safe(d.split(":")[0])]
        old_shards = (saved.get("data") or {}).get("shards")
        if old_shards != cfg.data.shards:
            saved_fp = meta.get("data_fingerprint")
            if saved_fp is not None and saved_fp == data_fp:
                allowed = [d + " (same shards: manifest checksum " + saved_fp + ")" if d.startswith("data.shards:")
                           else d for d in allowed]
            else:
                why = ("the shards' content differs: manifest checksum " f"{saved_fp} -> {data_fp}"
                       if saved_fp is not None and data_fp is not None else
                       "no manifest.json checksum to show the content is the same")
                allowed = [d for d in allowed if not d.startswith("data.shards:")]
                refused.append(f"data.shards: {old_shards!r} -> {cfg.data.shards!r} ({why})")
    if refused:
        shown = "; ".join(refused[:8]) + (f"; ... ({len(refused) - 8} more)" if len(refused) > 8 else "")
        msg = (f"checkpoint {where} was written by a different config (hash {meta.get('config_hash')}, this "
               f"config {config_hash(cfg)}): {shown}")
        if not force:
            raise ConfigError(msg + ". Resume under the config it was written with (run.dir's config.yaml), "
                              "start over in a new run.dir, or set checkpoint.force=true to load it anyway.")
        log.warning("%s -- loading anyway because checkpoint.force=true", msg)
    for d in allowed:
        note = ""
        if d.startswith("trainer.max_steps:"):
            note = f" (lr schedule and progress re-planned from step {meta.get('step')})"
        elif d.startswith("data.num_workers:"):
            note = " (the loader streams are re-split: the data order restarts this epoch)"
        log.info("resume with a changed setting: %s%s", d, note)
    return allowed
