"""Which checkpoint a run resumes from: found, verified (with a fallback past damaged ones) and
checked against the config, before the engine is built.

    resume = find_resume(checkpointer, cfg, data_fp)   # collective: a Resume (found or not), config checked
    source = pick_resume(checkpointer, cfg.checkpoint.resume, cfg.checkpoint.force)   # (dir, tag) or None

- ``auto``: this run's ``latest``, if it verifies (:func:`~mohico.trainer.checkpoint.verify.verify_checkpoint`:
  every file present with the size and sha256 recorded at save time). A damaged one is moved
  aside to ``checkpoints/damaged-<tag>`` (kept for inspection, never loaded or pruned) with a
  warning, and the newest intact checkpoint is used instead (``latest`` is rewritten to it). If
  none is intact the run stops with every checkpoint's problems listed. A ``latest`` that holds
  no tag (any bytes, binary included) is ignored with a warning naming it, and rewritten.
- ``latest`` naming an intact checkpoint older than another intact one (restored, edited, or a
  crash between a save's rename and its ``latest`` write) stops the run (ConfigError, exit 2)
  naming the newer ones and the fix; nothing is changed. Newer damaged ones are moved aside.
- Whatever it resumes from, a checkpoint folder of this run newer than that step is renamed to
  ``<tag>.superseded-<UTC time>`` with a warning (:func:`set_aside_newer`): the saves that
  follow never overwrite it and rotation never deletes it.
- ``never``: start fresh; refused when the run directory already holds checkpoints (a fresh
  run would overwrite them and rotation would delete them) unless ``checkpoint.force=true``.
- a path: that checkpoint, which must verify (no fallback for an explicit choice).

Rank 0 reads and hashes the files once and broadcasts its decision, so every rank resumes
from the same checkpoint and raises the same error.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mohico import dist
from mohico.errors import ConfigError, MohicoError
from mohico.trainer.checkpoint.checkpointer import Checkpointer
from mohico.trainer.checkpoint.config_check import check_config
from mohico.trainer.checkpoint.layout import (LATEST, META, TAG_RE, check_format, complete_tags, fresh_start_problem,
                                              read_latest, read_meta, resolve_checkpoint)
from mohico.trainer.checkpoint.universal import universal_form
from mohico.trainer.checkpoint.verify import verify_checkpoint
from mohico.utils import atomic_write_text

log = logging.getLogger("mohico.trainer")

DAMAGED_PREFIX = "damaged-"
SUPERSEDED = ".superseded-"     # <tag>.superseded-<UTC time>: a newer checkpoint kept aside by a resume from an older one


def _step(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def quarantine(ckdir: Path, tag: str) -> Path | None:
    """Move ``ckdir/tag`` to ``ckdir/damaged-<tag>`` (numbered if taken); None if it is absent."""
    src = Path(ckdir) / tag
    if not src.is_dir():
        return None
    dst, n = Path(ckdir) / f"{DAMAGED_PREFIX}{tag}", 1
    while dst.exists():
        n += 1
        dst = Path(ckdir) / f"{DAMAGED_PREFIX}{tag}.{n}"
    os.rename(src, dst)
    return dst


def _auto(ckpt: Checkpointer) -> tuple[Path, str] | None:
    latest = read_latest(ckpt.dir)     # any bytes: undecodable ones escaped, never raises
    ignored = latest is not None and not TAG_RE.match(latest)
    if ignored:
        log.warning("%s names %r, which is not a checkpoint tag (step_NNNNNNNN): ignored, resuming from the "
                    "newest intact checkpoint", ckpt.dir / LATEST, latest[:80])
        latest = None
    tags = sorted(set(complete_tags(ckpt.dir)) | ({latest} if latest else set()), reverse=True)
    if latest is None and not tags:
        return None
    if latest in tags:   # latest first, then the others newest first
        tags.remove(latest)
        tags.insert(0, latest)
    report = []
    for tag in tags:
        problems = verify_checkpoint(ckpt.dir, tag)
        if not problems:
            _refuse_newer(ckpt, tag)
            if report:
                log.warning("resuming from the newest intact checkpoint %s instead", ckpt.dir / tag)
            if report or ignored:
                atomic_write_text(ckpt.dir / LATEST, tag)
            return ckpt.dir, tag
        moved = quarantine(ckpt.dir, tag)
        where = f"; moved to {moved} (kept, never loaded)" if moved else ""
        log.warning("checkpoint %s is damaged: %s%s", ckpt.dir / tag, "; ".join(problems), where)
        report.append(f"{tag}: {'; '.join(problems)}")
    raise MohicoError(f"no intact checkpoint in {ckpt.dir} to resume from ({' | '.join(report)}); the damaged "
                      f"ones were moved to {DAMAGED_PREFIX}<tag>. Start over with a new run.dir, or set "
                      f"checkpoint.resume=never checkpoint.force=true to start fresh in this one.")


def _refuse_newer(ckpt: Checkpointer, tag: str) -> None:
    """``latest`` names intact ``tag`` but newer checkpoints exist: the damaged ones are moved
    aside (:func:`quarantine`); any intact one stops the resume (ConfigError, nothing changed),
    since resuming from ``tag`` would overwrite and rotate them away."""
    intact = []
    for newer in [t for t in complete_tags(ckpt.dir) if _step(t) > _step(tag)]:
        problems = verify_checkpoint(ckpt.dir, newer)
        if not problems:
            intact.append(newer)
            continue
        moved = quarantine(ckpt.dir, newer)
        log.warning("checkpoint %s (newer than %s, which %s names) is damaged: %s; moved to %s (kept, never loaded)",
                    ckpt.dir / newer, tag, ckpt.dir / LATEST, "; ".join(problems), moved)
    if intact:
        raise ConfigError(
            f"{ckpt.dir / LATEST} names {tag}, but newer intact checkpoints exist: "
            f"{', '.join(str(ckpt.dir / t) for t in intact)}. Resuming from {tag} would overwrite them with new "
            f"saves and rotation would delete them, so nothing was resumed or changed (was `latest` restored from "
            f"a backup, edited, or left by a crash between a save's rename and its `latest` write?). Resume from "
            f"the newest with checkpoint.resume={ckpt.dir / intact[-1]}, or from {tag} on purpose with "
            f"checkpoint.resume={ckpt.dir / tag}, which keeps the newer ones aside as <tag>{SUPERSEDED}<time> "
            f"(never loaded or deleted).")


def set_aside_newer(ckpt: Checkpointer, step: int) -> list[Path]:
    """Rank 0 renames every checkpoint folder of this run newer than ``step`` (the step a resume
    continues from) to ``<tag>.superseded-<UTC time>``, with its universal form, and warns naming
    each: the saves that follow would overwrite them and rotation delete them (collective)."""
    moved: list[Path] = []
    if ckpt.rank == 0 and ckpt.dir.is_dir():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for src in sorted(ckpt.dir.iterdir()):
            if not (src.is_dir() and TAG_RE.match(src.name) and _step(src.name) > step):
                continue
            dst, n = ckpt.dir / f"{src.name}{SUPERSEDED}{stamp}", 1
            while dst.exists():
                n += 1
                dst = ckpt.dir / f"{src.name}{SUPERSEDED}{stamp}.{n}"
            os.rename(src, dst)
            uni = ckpt.dir / "universal" / src.name
            if uni.is_dir():
                os.rename(uni, uni.parent / dst.name)
            moved.append(dst)
            log.warning("checkpoint %s is newer than the step %d this run resumes from: kept aside as %s (never "
                        "loaded or deleted; the saves that follow would overwrite it)", src, step, dst)
    dist.barrier()
    return moved


def _decide(ckpt: Checkpointer, resume: str, force: bool) -> tuple[Path, str] | None:
    if resume == "never":
        problem = fresh_start_problem(ckpt.dir, force)
        if problem:
            raise MohicoError(problem)
        return None
    if resume == "auto":
        return _auto(ckpt)
    ckdir, tag = resolve_checkpoint(resume)
    problems = verify_checkpoint(ckdir, tag)
    if problems:
        intact = [t for t in complete_tags(ckdir) if t != tag and not verify_checkpoint(ckdir, t, hashes=False)]
        raise MohicoError(f"checkpoint.resume={resume}: checkpoint {ckdir / tag} is damaged ({'; '.join(problems)}); "
                          f"other checkpoints there: {intact or 'none'}")
    return ckdir, tag


def pick_resume(ckpt: Checkpointer, resume: str, force: bool) -> tuple[Path, str] | None:
    """``(checkpoints_dir, tag)`` to resume from, or None to start fresh (collective: rank 0
    decides, the others follow; every rank raises the same MohicoError)."""
    decision = None
    if ckpt.rank == 0:
        try:
            found = _decide(ckpt, resume, force)
            decision = ("ok", None if found is None else (str(found[0]), found[1]))
        except ConfigError as e:
            decision = ("config", str(e))
        except MohicoError as e:
            decision = ("error", str(e))
    status, value = dist.broadcast_object(decision, src=0)
    if status in ("error", "config"):
        raise (ConfigError if status == "config" else MohicoError)(value)
    return None if value is None else (Path(value[0]), value[1])


@dataclass
class Resume:
    """What a run resumes from: nothing (``found`` False: a fresh run), or checkpoint
    ``dir/tag`` with its ``meta``; DeepSpeed loads from ``engine_dir/tag`` (the universal form
    when the world size changed at ZeRO 1/2: ``universal``)."""
    dir: Path | None = None
    tag: str | None = None
    meta: dict | None = None
    engine_dir: Path | None = None
    universal: bool = False

    @property
    def found(self) -> bool:
        return self.tag is not None


def find_resume(ckpt: Checkpointer, cfg, data_fp: str | None) -> Resume:
    """The checkpoint this run resumes from (collective), decided before the engine is built:
    partial saves removed, ``checkpoint.resume`` resolved and verified (:func:`pick_resume`),
    the layout and config checked (:func:`~mohico.trainer.checkpoint.config_check.check_config`, ``data_fp``:
    the shards' fingerprint) and, at another world size with ZeRO 1/2, the universal form made."""
    ckpt.remove_partial()
    source = pick_resume(ckpt, cfg.checkpoint.resume, cfg.checkpoint.force)
    if source is None:
        return Resume()
    ckdir, tag = source
    meta = read_meta(ckdir, tag)
    check_format(meta, ckdir / tag / META)
    check_config(meta, cfg, ckdir / tag, cfg.checkpoint.force, data_fp=data_fp)
    set_aside_newer(ckpt, int(meta["step"]))   # never overwrite or rotate away a newer checkpoint
    if ckdir.resolve() != ckpt.dir.resolve():   # another run's checkpoint: this run logs to a new W&B run
        meta = {**meta, "wandb_run_id": None}
    universal = meta["world_size"] != ckpt.world_size and meta.get("zero_stage", 0) >= 1
    engine_dir, _ = universal_form(ckdir, tag, ckpt.rank) if universal else (ckdir, tag)
    return Resume(ckdir, tag, meta, engine_dir, universal)
