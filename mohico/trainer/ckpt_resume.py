"""Which checkpoint a run resumes from, verified, with a fallback past damaged ones.

    source = pick_resume(checkpointer, cfg.checkpoint.resume, cfg.checkpoint.force)   # collective

- ``auto``: this run's ``latest``, if it verifies (:func:`~mohico.trainer.ckpt_files.verify_checkpoint`:
  every file present with the size and sha256 recorded at save time). A damaged one is moved
  aside to ``checkpoints/damaged-<tag>`` (kept for inspection, never loaded or pruned) with a
  warning, and the newest intact checkpoint is used instead (``latest`` is rewritten to it). If
  none is intact the run stops with every checkpoint's problems listed.
- ``never``: start fresh; refused when the run directory already holds checkpoints (a fresh
  run would overwrite them and rotation would delete them) unless ``checkpoint.force=true``.
- a path: that checkpoint, which must verify (no fallback for an explicit choice).

Rank 0 reads and hashes the files once and broadcasts its decision, so every rank resumes
from the same checkpoint and raises the same error.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from mohico import dist
from mohico.errors import MohicoError
from mohico.trainer import checkpoint as ck
from mohico.trainer.ckpt_files import verify_checkpoint
from mohico.utils import atomic_write_text

log = logging.getLogger("mohico.trainer")

DAMAGED_PREFIX = "damaged-"


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


def _auto(ckpt: ck.Checkpointer) -> tuple[Path, str] | None:
    latest = ck.read_latest(ckpt.dir)
    if latest is not None and not ck.TAG_RE.match(latest):
        log.warning("%s names %r, which is not a checkpoint tag (step_NNNNNNNN): ignored", ckpt.dir / ck.LATEST, latest)
        latest = None
    tags = sorted(set(ck.complete_tags(ckpt.dir)) | ({latest} if latest else set()), reverse=True)
    if latest is None and not tags:
        return None
    if latest in tags:   # latest first, then the others newest first
        tags.remove(latest)
        tags.insert(0, latest)
    report = []
    for tag in tags:
        problems = verify_checkpoint(ckpt.dir, tag)
        if not problems:
            if report:
                log.warning("resuming from the newest intact checkpoint %s instead", ckpt.dir / tag)
                atomic_write_text(ckpt.dir / ck.LATEST, tag)
            return ckpt.dir, tag
        moved = quarantine(ckpt.dir, tag)
        where = f"; moved to {moved} (kept, never loaded)" if moved else ""
        log.warning("checkpoint %s is damaged: %s%s", ckpt.dir / tag, "; ".join(problems), where)
        report.append(f"{tag}: {'; '.join(problems)}")
    raise MohicoError(f"no intact checkpoint in {ckpt.dir} to resume from ({' | '.join(report)}); the damaged "
                      f"ones were moved to {DAMAGED_PREFIX}<tag>. Start over with a new run.dir, or set "
                      f"checkpoint.resume=never checkpoint.force=true to start fresh in this one.")


def _decide(ckpt: ck.Checkpointer, resume: str, force: bool) -> tuple[Path, str] | None:
    if resume == "never":
        tags = ck.complete_tags(ckpt.dir)
        if tags and not force:
            raise MohicoError(
                f"checkpoint.resume=never, but run.dir {ckpt.dir.parent} already holds checkpoints ({', '.join(tags)}): "
                f"a fresh run would overwrite them and rotation would delete them. Use a new run.dir, resume "
                f"with checkpoint.resume=auto (or checkpoint.resume={ckpt.dir / tags[-1]}), or set "
                f"checkpoint.force=true to start over here and let rotation delete them.")
        return None
    if resume == "auto":
        return _auto(ckpt)
    ckdir, tag = ck.resolve_checkpoint(resume)
    problems = verify_checkpoint(ckdir, tag)
    if problems:
        intact = [t for t in ck.complete_tags(ckdir) if t != tag and not verify_checkpoint(ckdir, t, hashes=False)]
        raise MohicoError(f"checkpoint.resume={resume}: checkpoint {ckdir / tag} is damaged ({'; '.join(problems)}); "
                          f"other checkpoints there: {intact or 'none'}")
    return ckdir, tag


def pick_resume(ckpt: ck.Checkpointer, resume: str, force: bool) -> tuple[Path, str] | None:
    """``(checkpoints_dir, tag)`` to resume from, or None to start fresh (collective: rank 0
    decides, the others follow; every rank raises the same MohicoError)."""
    decision = None
    if ckpt.rank == 0:
        try:
            found = _decide(ckpt, resume, force)
            decision = ("ok", None if found is None else (str(found[0]), found[1]))
        except MohicoError as e:
            decision = ("error", str(e))
    status, value = dist.broadcast_object(decision, src=0)
    if status == "error":
        raise MohicoError(value)
    return None if value is None else (Path(value[0]), value[1])
