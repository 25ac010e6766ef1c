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

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mohico.errors import MohicoError
from mohico.trainer.resume_check import check_config, config_difference  # noqa: F401 - re-exported
from mohico.trainer.ckpt_files import (META, file_digests, folder_bytes, gather_digests, safe_load,
                                      write_failure_message)
from mohico.trainer.ckpt_universal import write_universal  # noqa: F401 - part of this module's API
from mohico.utils import atomic_write_json, atomic_write_text

log = logging.getLogger("mohico.trainer")

LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def client_file(rank: int) -> str:
    return f"client_rank_{rank:05d}.pt"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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


# --------------------------------------------------------------------------- finding checkpoints
def read_latest(ckdir: Path) -> str | None:
    p = Path(ckdir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag or None


def complete_tags(ckdir: Path) -> list[str]:
    """Complete checkpoint tags in step order (folders with their meta file)."""
    ckdir = Path(ckdir)
    if not ckdir.is_dir():
        return []
    tags = [p.name for p in ckdir.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / META).is_file()]
    return sorted(tags)


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """``(checkpoints_dir, tag)`` for a run directory, a checkpoints directory (its ``latest``)
    or one checkpoint folder. Raises MohicoError naming the path if none is there."""
    p = Path(path)
    if (p / META).is_file() or (p / "mp_rank_00_model_states.pt").is_file():
        return p.parent, p.name
    for ckdir in (checkpoint_dir(p), p):
        tag = read_latest(ckdir)
        if tag is not None:
            if not (ckdir / tag).is_dir():
                raise MohicoError(f"{ckdir / LATEST} points to '{tag}', which does not exist in {ckdir} "
                                  f"(complete checkpoints there: {complete_tags(ckdir) or 'none'})")
            return ckdir, tag
    raise MohicoError(f"no checkpoint at {p}: expected a run directory (with checkpoints/latest), a "
                      f"checkpoints directory (with 'latest') or a checkpoint folder (with {META})")


def read_meta(ckdir: Path, tag: str) -> dict:
    path = Path(ckdir) / tag / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MohicoError(f"{path}: cannot read checkpoint metadata ({e}); the checkpoint is incomplete "
                          f"or not a mohico checkpoint") from None


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
        _barrier()

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
        _barrier()
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
        _barrier()
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
        failed = torch.tensor([1 if error else 0], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(failed)
        if failed.item():
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


# --------------------------------------------------------------------------- export
def load_module_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(module_state_dict, meta)`` of a checkpoint given as a run directory, checkpoints
    directory or checkpoint folder: the full (unsharded) module weights DeepSpeed keeps in
    ``mp_rank_00_model_states.pt`` at ZeRO 0-2 (fp32: bf16 runs through autocast), buffers and
    the key encoder included. (DeepSpeed's zero_to_fp32 gives the same trainable weights from the
    ZeRO partitions.)"""
    ckdir, tag = resolve_checkpoint(path)
    model_file = ckdir / tag / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise MohicoError(f"{model_file} is missing: {ckdir / tag} is not a DeepSpeed ZeRO 0-2 checkpoint")
    sd = safe_load(model_file)
    state = dict(sd["module"])
    meta = (sd.get("mohico") or {}) if isinstance(sd, dict) else {}
    if (ckdir / tag / META).is_file():
        meta = read_meta(ckdir, tag)
    return state, meta


def load_backbone_state(path: str | os.PathLike) -> tuple[str, dict, dict]:
    """``(backbone_name, options, backbone_state_dict)`` of a training checkpoint (run directory,
    checkpoints directory or checkpoint folder): the online backbone (``backbone.*`` of the
    PretrainModule), named by the config saved with the checkpoint."""
    state, meta = load_module_state(path)
    model = (meta.get("config") or {}).get("model") or {}
    if "backbone" not in model:
        raise MohicoError(f"{path}: the checkpoint has no saved config naming its backbone (model.backbone)")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise MohicoError(f"{path}: the checkpoint's module has no 'backbone.*' weights "
                          f"(keys start with {sorted({k.split('.')[0] for k in state})[:5]})")
    return model["backbone"], dict(model.get("backbone_options") or {}), backbone


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
