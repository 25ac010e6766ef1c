"""The checkpointer: saves and loads a run's states (:mod:`mohico.trainer.states`), atomically.

    ckpt = Checkpointer(run_dir, rank, world, keep, faults)
    ckpt.save(states)              # collective: every rank writes, rank 0 publishes
    ckpt.load(states, resume)      # resume: checkpoint.resume.find_resume(...)

``states["engine"]`` writes DeepSpeed's own sharded files, ``states["train"]`` is the metadata
(``mohico_meta.json``), every other state's ``state_dict()`` goes into this rank's
``client_rank_{r}.pt`` under its name (layout: :mod:`mohico.trainer.checkpoint.layout`).

Atomic save protocol: every rank writes into ``.tmp-<tag>``, fsyncs and hashes what it wrote,
and meets the others at a gather of the digests; only then does rank 0 write the meta (with the
digests), rename the folder to ``<tag>`` and replace ``latest``. A crash at any point leaves
``latest`` on the previous complete checkpoint; a failed write (disk full) removes the partial
folder and raises the same message on every rank. The last ``checkpoint.keep`` checkpoints are kept.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import torch

from mohico import dist
from mohico.checkpoint_read import safe_load
from mohico.errors import MohicoError
from mohico.trainer.checkpoint.layout import (GLOBAL_STATES, FORMAT, LATEST, META, TMP_PREFIX, checkpoint_dir,
                                              client_file, complete_tags, read_latest, tag_for)
from mohico.trainer.checkpoint.verify import file_digests
from mohico.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("mohico.trainer")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run. Every rank makes one; calls are
    collective. ``faults``: :class:`mohico.trainer.faults.Faults` (tests kill a rank mid-save).

    ``states`` (:mod:`mohico.trainer.states`): ``"engine"`` writes DeepSpeed's own files,
    ``"train"`` is the metadata (``mohico_meta.json``, written by rank 0), every other entry's
    ``state_dict()`` goes into this rank's ``client_rank_{r}.pt`` under its name."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, keep: int, faults=None):
        self.dir = checkpoint_dir(run_dir)
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.faults = faults

    def remove_partial(self) -> None:
        """Rank 0 deletes ``.tmp-*`` folders left by a crash during a save (collective)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(TMP_PREFIX) and p.is_dir():
                    log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def save(self, states: dict) -> Path:
        """Write the checkpoint of ``states`` at ``states["train"]``'s step (collective) and publish it.

        A rank whose write fails (disk full, I/O error, quota) removes the partial folder and raises
        at once, naming the path, the space needed and the last intact checkpoint; a peer whose
        collective then breaks removes the folder too (it may have written into it since; a peer killed
        from outside leaves it to the restart) and stops naming that rank (``peer_failure``): every
        rank exits 1 in seconds, not at the watchdog."""
        try:
            return self._save(states)
        except Exception as e:
            from mohico.trainer.peer_failure import is_peer_failure, peer_failure_message, read_notes
            if is_peer_failure(e):
                peer_failure_message(self.dir.parent, self.rank, e, world=self.world_size)   # waits for a note
                if read_notes(self.dir.parent, self.rank):   # a peer stopped on an error (its write failed)
                    shutil.rmtree(self.dir / (TMP_PREFIX + tag_for(int(states["train"].step))), ignore_errors=True)
                # a peer killed from outside leaves its partial folder to the restart (remove_partial)
            raise

    def _save(self, states: dict) -> Path:
        meta = {**states["train"].state_dict(), "format": FORMAT}
        step = int(meta["step"])
        rank_state = {"rank": self.rank, **{name: state.state_dict() for name, state in states.items()
                                             if name not in GLOBAL_STATES}}
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp = self.dir / tmp_tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        dist.barrier()
        own = tmp / client_file(self.rank)
        digests, error = {}, ""
        if self.faults is not None:
            self.faults.disk_full(step, getattr(states["engine"], "engine", None))
        try:
            states["engine"].save(self.dir, tmp_tag, client_state={"mohico": meta})
            torch.save(rank_state, own)
            mine = [f for f in tmp.iterdir() if f.name == own.name or f"_rank_{self.rank}_" in f.name
                    or (self.rank == 0 and f.name.startswith("mp_rank"))]
            for f in mine:        # flush what this rank wrote before the others may publish it
                _fsync_file(f)
            digests = file_digests(mine)
        except (OSError, RuntimeError) as e:   # disk full, I/O error: this rank stops now
            # No collective from here: the other ranks may be inside DeepSpeed's save, waiting at a
            # barrier this rank will never reach. This rank removes the partial folder, raises (its
            # note names the cause) and exits; their collective then breaks on the closed connection
            # and each names this rank and its message (peer_failure), in seconds, not at the watchdog.
            from mohico.trainer.peer_failure import is_peer_failure
            if is_peer_failure(e):    # a collective inside DeepSpeed's save broke: a peer stopped (save() cleans up)
                raise
            raise self._write_failed(e, tmp, step) from None
        if self.faults is not None:
            self.faults.mid_save(step)
        digests = gather_digests(digests, error, tmp if self.rank == 0 else None)   # every rank has written
        final = self.dir / tag
        if self.rank == 0:
            if final.exists():    # left by a run that crashed after the rename but before 'latest'
                shutil.rmtree(final)
            try:
                atomic_write_json(tmp / META, {**meta, "files": digests})
                os.rename(tmp, final)
            except OSError as e:          # the others wait at the barrier below: stop now, as above
                raise self._write_failed(e, tmp, step) from None
            _fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep_tag=tag)
        dist.barrier()
        return final

    def _write_failed(self, e: BaseException, tmp: Path, step: int) -> MohicoError:
        """The error for this rank's failed write of checkpoint ``step``; the partial ``tmp`` is removed."""
        # The partial folder is gone and this rank did not remove it: another rank's write failed and it
        # removed the folder while this rank was writing into it. Name that rank, not this echo: the
        # echo is FileNotFoundError from the file system, or torch.save's RuntimeError ("Parent
        # directory ... does not exist", its zip writer failing); not a disk-full OSError of its own.
        vanished = isinstance(e, FileNotFoundError) or (isinstance(e, RuntimeError) and not isinstance(e, OSError))
        if vanished and not tmp.exists():
            from mohico.errors import PeerFailureError
            from mohico.trainer.peer_failure import peer_failure_message
            return PeerFailureError(peer_failure_message(self.dir.parent, self.rank, e, world=self.world_size))
        shutil.rmtree(tmp, ignore_errors=True)
        latest = read_latest(self.dir)
        msg = write_failure_message(e, tmp, self.dir, step, latest, folder_bytes(self.dir / latest) if latest else 0)
        return MohicoError(f"rank {self.rank}: {msg}")

    def load(self, states: dict, resume) -> None:
        """Load ``states`` from ``resume`` (:class:`mohico.trainer.checkpoint.resume.Resume`; nothing
        when it found no checkpoint). At the saved world size each per-rank state loads its own
        rank's entry; at another one each state's ``reshard(every old rank's entry, step)``
        makes its share (banks resharded, fresh loader and RNG streams)."""
        if not resume.found:
            return
        meta = resume.meta
        states["engine"].load(resume.engine_dir, resume.tag, meta.get("zero_stage"))
        states["train"].load_state_dict(meta)
        per_rank = {name: state for name, state in states.items() if name not in GLOBAL_STATES}
        old_world, step = int(meta["world_size"]), int(meta["step"])
        if old_world == self.world_size:
            saved = load_rank_state(resume.dir, resume.tag, self.rank)
            for name, state in per_rank.items():
                state.load_state_dict(_entry(saved, name, resume.dir / resume.tag / client_file(self.rank)))
        else:
            log.warning("resuming a %d-rank checkpoint on %d ranks: bank resharded; the data stream and RNG "
                        "streams restart from step-dependent seeds (not bitwise-continuous)", old_world, self.world_size)
            saved = load_rank_states(resume.dir, resume.tag, old_world)
            for name, state in per_rank.items():
                if not hasattr(state, "reshard"):
                    raise MohicoError(f"state '{name}' ({type(state).__name__}) has no reshard(): it cannot be "
                                      f"resumed from a {old_world}-rank checkpoint on {self.world_size} ranks; "
                                      f"resume with {old_world} ranks")
                state.reshard([_entry(s, name, resume.dir / resume.tag / client_file(r)) for r, s in enumerate(saved)],
                              step)
        log.info("resumed from %s at step %d", resume.dir / resume.tag, step)

    def _prune(self, keep_tag: str) -> None:
        tags = complete_tags(self.dir)
        for old in tags[:-self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / "universal" / old, ignore_errors=True)


def load_rank_state(ckdir: Path, tag: str, rank: int, world_size: int | None = None) -> dict:
    """Rank ``rank``'s per-rank states (``{name: state_dict}``: loader, banks, RNG, ...)."""
    path = Path(ckdir) / tag / client_file(rank)
    if not path.is_file():
        raise MohicoError(f"{path} is missing: checkpoint {Path(ckdir) / tag} was written by "
                          f"{world_size or 'more'} ranks and is incomplete")
    return safe_load(path)


def load_rank_states(ckdir: Path, tag: str, world_size: int) -> list[dict]:
    """Every saved rank's per-rank states, in rank order."""
    return [load_rank_state(ckdir, tag, r, world_size) for r in range(world_size)]


def _entry(saved: dict, name: str, path: Path):
    """State ``name`` of a rank file, or an error naming the file and the fix."""
    if not isinstance(saved, dict) or name not in saved:
        held = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise MohicoError(f"{path} holds no '{name}' state (it holds {held}): it was written by another mohico "
                          f"release or another program. Resume it with the release that wrote it, or start over "
                          f"with a new run.dir (`mohico export` still reads its weights)")
    return saved[name]


# --------------------------------------------------------------------------- write failures
def folder_bytes(folder: Path) -> int:
    """Total size of the files directly in ``folder`` (0 if it does not exist)."""
    if not Path(folder).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def is_disk_full(e: BaseException) -> bool:
    """An exception from writing a file that means 'no space left' (OSError ENOSPC/EDQUOT, or
    torch's ``inline_container.cc`` writer failure, which hides the errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left" in text or "Disk quota" in text or (
        "inline_container" in text and ("write" in text or "unexpected pos" in text))


def write_failure_message(e: BaseException, tmp: Path, ckdir: Path, step: int, last_intact: str | None,
                          previous_bytes: int) -> str:
    """What to tell the user when writing checkpoint ``step`` into ``tmp`` failed with ``e``."""
    try:
        free = shutil.disk_usage(ckdir).free
    except OSError:
        free = -1
    last = f"the last intact checkpoint is {ckdir / last_intact}" if last_intact else "there is no earlier checkpoint"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if is_disk_full(e) or (previous_bytes and 0 <= free < previous_bytes):
        need = f"about {previous_bytes / 2**20:.1f} MiB (the size of the previous checkpoint)" if previous_bytes \
            else "the size of one checkpoint"
        return (f"disk full while writing checkpoint step {step} to {tmp}: it needs {need}, "
                f"{max(free, 0) / 2**20:.1f} MiB are free on that filesystem; {last} (nothing of it was "
                f"touched). Free space or lower checkpoint.keep, then run again: it resumes from there. "
                f"({type(e).__name__}: {first})")
    return f"writing checkpoint step {step} to {tmp} failed ({type(e).__name__}: {first}); {last}"


def gather_digests(mine: dict, error: str, tmp: Path | None) -> dict:
    """Every rank's file digests merged (collective; a barrier). If any rank failed to write,
    rank 0 (``tmp`` given) removes the partial folder and every rank raises that rank's error."""
    parts = dist.all_gather_object((mine, error))
    failed = [(r, e) for r, (_, e) in enumerate(parts) if e]
    if failed:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, msg = failed[0]
        raise MohicoError(f"rank {rank}: {msg}")
    merged: dict = {}
    for d, _ in parts:
        merged.update(d)
    if tmp is not None:       # files no rank claimed (rank 0 hashes them)
        merged.update(file_digests([f for f in tmp.iterdir() if f.is_file() and f.name not in merged and f.name != META]))
    return merged
