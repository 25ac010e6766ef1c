"""Sharded, atomic, resumable checkpoints.

Layout under ``run.dir/checkpoints/``::

    latest                         the tag of the newest complete checkpoint (written last, atomically)
    step_00000500/                 one DeepSpeed tag folder per checkpoint
        mp_rank_00_model_states.pt                  module (+ key encoder), optimizer at ZeRO 0, client state
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt  ZeRO 1/2 optimizer partitions, one per rank
        client_rank_{r:05d}.pt                       per rank: loader state, bank shard, RNG states
        mohico_meta.json                             step, epoch, progress, world size, W&B id, config + hash
    .tmp-step_00000500/            a checkpoint being written (never loaded; removed at start-up)
    universal/step_00000500/       DeepSpeed universal form, made when resuming at another world size
    zero_to_fp32.py                DeepSpeed's consolidation script (works with this layout)

Atomicity: every rank writes into ``.tmp-<tag>``, fsyncs what it wrote, and meets the others at a
barrier; only then does rank 0 rename the folder to ``<tag>`` and replace ``latest``. A crash at
any point leaves ``latest`` on the previous complete checkpoint. The last ``checkpoint.keep``
checkpoints are kept.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mohico import dist
# the readers live on the bottom floor (models read checkpoints too); ck.read_meta etc. stay reachable
from mohico.checkpoint_read import (LATEST, META, MODEL_STATES, TAG_RE, checkpoint_dir,  # noqa: F401
                                    complete_tags, load_backbone_state, load_module_state, read_latest,
                                    read_meta, resolve_checkpoint, safe_load)
from mohico.errors import MohicoError
from mohico.trainer.resume_check import check_config, config_difference  # noqa: F401 - re-exported
from mohico.trainer.ckpt_files import file_digests, folder_bytes, gather_digests, write_failure_message
from mohico.trainer.ckpt_universal import write_universal  # noqa: F401 - part of this module's API
from mohico.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("mohico.trainer")

TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def client_file(rank: int) -> str:
    return f"client_rank_{rank:05d}.pt"


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


# --------------------------------------------------------------------------- RNG
def rng_state(cuda: bool = True) -> dict:
    """Python, NumPy and torch CPU generator states of this process, plus (``cuda=True``) the
    CUDA generator of this rank's current device only: reading every device's would create a
    CUDA context on each GPU of the node from every rank."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()   # as a tensor: loads with weights_only
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- saving
class Checkpointer:
    """Saves and finds the checkpoints of one run. Every rank makes one; calls are collective."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, keep: int):
        self.dir = checkpoint_dir(run_dir)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    def remove_partial(self) -> None:
        """Rank 0 deletes ``.tmp-*`` folders left by a crash during a save (collective)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(TMP_PREFIX) and p.is_dir():
                    log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def save(self, engine, step: int, meta: dict, rank_state: dict) -> Path:
        """Write checkpoint ``step`` (collective): DeepSpeed's sharded files, this rank's
        ``rank_state`` (loader, bank shard, RNG) and, from rank 0, ``meta``; then publish it."""
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
        try:
            engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"mohico": meta}, save_latest=False)
            torch.save(rank_state, own)
            mine = [f for f in tmp.iterdir() if f.name == own.name or f"_rank_{self.rank}_" in f.name
                    or (self.rank == 0 and f.name.startswith("mp_rank"))]
            for f in mine:        # flush what this rank wrote before the others may publish it
                _fsync_file(f)
            digests = file_digests(mine)
        except (OSError, RuntimeError) as e:   # disk full, I/O error: every rank stops below
            error = write_failure_message(e, tmp, self.dir, step, read_latest(self.dir),
                                          folder_bytes(self.dir / read_latest(self.dir)) if read_latest(self.dir) else 0)
        _fault_point("save", step, self.rank)
        digests = gather_digests(digests, error, tmp if self.rank == 0 else None)   # every rank has written
        final = self.dir / tag
        if self.rank == 0:
            if final.exists():    # left by a run that crashed after the rename but before 'latest'
                shutil.rmtree(final)
            atomic_write_json(tmp / META, {**meta, "files": digests})
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep_tag=tag)
        dist.barrier()
        return final

    def _prune(self, keep_tag: str) -> None:
        tags = complete_tags(self.dir)
        for old in tags[:-self.keep]:
            if old != keep_tag:
                shutil.rmtree(self.dir / old, ignore_errors=True)
                shutil.rmtree(self.dir / "universal" / old, ignore_errors=True)

    # ----------------------------------------------------------------------- resuming
    def universal(self, ckdir: Path, tag: str) -> tuple[Path, str]:
        """DeepSpeed's universal form of a ZeRO 1/2 checkpoint, for loading at another world
        size (collective; rank 0 converts once into ``<ckdir>/universal/<tag>``)."""
        out_root = Path(ckdir) / "universal"
        out = out_root / tag
        error = ""
        if self.rank == 0 and not (out / "zero").is_dir():
            tmp = out_root / (TMP_PREFIX + tag)
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("converting %s to DeepSpeed's universal checkpoint form (the world size changed)",
                     Path(ckdir) / tag)
            try:
                write_universal(Path(ckdir) / tag, tmp)
                if out.exists():
                    shutil.rmtree(out)
                os.rename(tmp, out)
                atomic_write_text(out_root / "latest_universal", tag)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = f"converting {Path(ckdir) / tag} to a universal checkpoint failed: {type(e).__name__}: {e}"
        if dist.any_rank(bool(error), "cuda" if torch.cuda.is_available() else "cpu"):
            raise MohicoError(error or "rank 0 failed to convert the checkpoint to universal form (see its log)")
        return out_root, tag


def load_rank_states(ckdir: Path, tag: str, world_size: int) -> list[dict]:
    """Every saved rank's client state (loader, bank shard, RNG), in rank order."""
    states = []
    for r in range(world_size):
        path = Path(ckdir) / tag / client_file(r)
        if not path.is_file():
            raise MohicoError(f"{path} is missing: checkpoint {Path(ckdir) / tag} was written by "
                              f"{world_size} ranks and is incomplete")
        states.append(safe_load(path))
    return states


def reshard_bank(states: list, world_size: int, rank: int):
    """This rank's bank state at a new world size from every old rank's ``bank_state_dict()``
    (rank order). A MemoryBank state is resharded with :meth:`MemoryBank.reshard` (age order
    kept); a dict of them (one bank per objective) is resharded entry by entry; ``None`` (no bank)
    stays ``None``."""
    from mohico.models.bank import MemoryBank

    first = states[0] if states else None
    if first is None:
        return None
    if isinstance(first, dict) and "keys" in first and "ptr" in first:
        return MemoryBank.reshard(list(states), world_size)[rank]
    if isinstance(first, dict):
        return {k: reshard_bank([s[k] for s in states], world_size, rank) for k in first}
    raise MohicoError(f"cannot reshard a bank state of type {type(first).__name__} to {world_size} ranks")


# --------------------------------------------------------------------------- fault injection (tests)
def _fault_point(where: str, step: int, rank: int) -> None:
    """Fault injection for tests: ``MOHICO_FAULT=save:STEP:RANK`` SIGKILLs that rank mid-save
    (files written, before the barrier), ``step:STEP:RANK`` right after optimizer step STEP."""
    spec = os.environ.get("MOHICO_FAULT", "")
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == where and int(parts[1]) == step and int(parts[2]) == rank:
        import signal

        log.warning("MOHICO_FAULT: killing rank %d during %s at step %d", rank, where, step)
        os.kill(os.getpid(), signal.SIGKILL)
