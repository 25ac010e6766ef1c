"""Checkpoint layout: where each file of a checkpoint lives. Finding checkpoints (``latest``, the
complete tags, a run directory / checkpoints directory / checkpoint folder given by the user) and
reading their metadata are in :mod:`mohico.checkpoint_read` (the bottom floor: export reads them
too), re-exported here.

Under ``run.dir/checkpoints/``::

    latest                         the tag of the newest complete checkpoint (written last, atomically)
    step_00000500/                 one folder per checkpoint (DeepSpeed's tag)
        mp_rank_00_model_states.pt                   "engine": module (+ EMA key encoder), optimizer at ZeRO 0
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt  "engine": ZeRO 1/2 optimizer partitions, one per rank
        client_rank_{r:05d}.pt                       every per-rank state (loader, banks, rng, ...) by name
        mohico_meta.json                             "train": step, schedule, world size, W&B id, config + hash;
                                                     format, sha256 of every file
    .tmp-step_00000500/            a checkpoint being written (never loaded; removed at start-up)
    damaged-step_00000500/         a checkpoint that failed verification (kept, never loaded)
    universal/step_00000500/       DeepSpeed universal form, made when resuming at another world size
    zero_to_fp32.py                DeepSpeed's consolidation script (works with this layout)
"""
from __future__ import annotations

from mohico.errors import MohicoError
# the readers live on the bottom floor (models read checkpoints too): re-exported here with the names
from mohico.checkpoint_read import (LATEST, META, MODEL_STATES, TAG_RE, checkpoint_dir,  # noqa: F401
                                    complete_tags, read_latest, read_meta, resolve_checkpoint)

TMP_PREFIX = ".tmp-"
FORMAT = 2                          # meta["format"]: this layout of states (resume refuses others)
GLOBAL_STATES = ("engine", "train")  # written once (DeepSpeed's files, the meta); the other states per rank


def check_format(meta: dict, where) -> None:
    """Refuse (MohicoError) a checkpoint whose ``meta`` (read from ``where``, its meta file) is of
    another layout than :data:`FORMAT`: its per-rank states are stored differently."""
    if meta.get("format") != FORMAT:
        raise MohicoError(f"{where} is a checkpoint of layout {meta.get('format', 1)}, this mohico "
                          f"reads layout {FORMAT} (the per-rank states are stored differently): resume it with "
                          f"the mohico release that wrote it, or start over in a new run.dir (`mohico export` still "
                          f"reads its weights)")


def fresh_start_problem(ckdir, force: bool) -> str | None:
    """Why ``checkpoint.resume=never`` may not start fresh in the run whose checkpoints folder is
    ``ckdir`` (it holds checkpoints that a fresh run would overwrite and rotation delete), unless
    ``force``; None if it may."""
    tags = complete_tags(ckdir)
    if not tags or force:
        return None
    return (f"checkpoint.resume=never, but run.dir {ckdir.parent} already holds checkpoints ({', '.join(tags)}): "
            f"a fresh run would overwrite them and rotation would delete them. Use a new run.dir, resume "
            f"with checkpoint.resume=auto (or checkpoint.resume={ckdir / tags[-1]}), or set "
            f"checkpoint.force=true to start over here and let rotation delete them.")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def client_file(rank: int) -> str:
    return f"client_rank_{rank:05d}.pt"
