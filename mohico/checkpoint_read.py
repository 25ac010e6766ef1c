"""Reading training checkpoints: finding them, their metadata, and the weights they hold.

Bottom floor (stdlib, torch, mohico.errors): ``models`` (export, ``mohico.load_encoder``) and
``trainer`` (resume, eval) both read checkpoints through it; the writers stay in
``mohico.trainer``. The layout under ``run.dir/checkpoints/`` (see ``mohico.trainer.checkpoint``)::

    latest                       the tag of the newest complete checkpoint
    step_00000500/               one DeepSpeed tag folder per checkpoint
        mp_rank_00_model_states.pt   the whole module at ZeRO 0-2 (fp32), with the client state
        mohico_meta.json             step, epoch, world size, W&B id, config + hash, file digests

    ckdir, tag = resolve_checkpoint("runs/mcl")        # run dir, checkpoints dir or one checkpoint
    meta = read_meta(ckdir, tag)                       # the mohico_meta.json dict
    state, meta = load_module_state("runs/mcl")        # full module state_dict (+ meta)
    name, options, backbone_sd = load_backbone_state("runs/mcl")

Loading never unpickles code: :func:`safe_load` is ``torch.load(weights_only=True)`` with only
DeepSpeed's plain optimizer-state classes allow-listed (its loss scaler, ZeRO stage enum and
fragment addresses), so a hostile ``.pt`` file fails with an error instead of running.
:func:`only_safe_torch_loads` does the same for every ``torch.load`` made inside it: resume
wraps DeepSpeed's ``load_checkpoint`` in it, whose own loader would unpickle anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from mohico.errors import MohicoError

META = "mohico_meta.json"
LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
TAG_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


# --------------------------------------------------------------------------- finding checkpoints
def read_latest(ckdir: Path) -> str | None:
    """What ``ckdir/latest`` names (stripped), or None if it is absent or empty. Any bytes are read
    safely: undecodable ones come back escaped (``\\xff``) and a file longer than any tag is cut to
    its first 256 bytes plus ``...``, so callers check the result against :data:`TAG_RE`."""
    p = Path(ckdir) / LATEST
    if not p.is_file():
        return None
    try:
        with open(p, "rb") as f:
            data = f.read(_LATEST_MAX + 1)
    except OSError:
        return None
    tag = data[:_LATEST_MAX].decode("utf-8", errors="backslashreplace").replace("\x00", "\\x00").strip()
    if len(data) > _LATEST_MAX:
        tag += "..."
    return tag or None


_LATEST_MAX = 256     # a tag is 13 characters: anything longer is not one


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
    if (p / META).is_file() or (p / MODEL_STATES).is_file():
        return p.parent, p.name
    for ckdir in (checkpoint_dir(p), p):
        tag = read_latest(ckdir)
        if tag is not None:
            if not TAG_RE.match(tag):
                raise MohicoError(f"{ckdir / LATEST} names {tag[:80]!r}, which is not a checkpoint tag "
                                  f"(step_NNNNNNNN): give the checkpoint folder itself (complete checkpoints "
                                  f"there: {complete_tags(ckdir) or 'none'})")
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



# --------------------------------------------------------------------------- weights
def load_module_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(module_state_dict, meta)`` of a checkpoint given as a run directory, checkpoints
    directory or checkpoint folder: the full (unsharded) module weights DeepSpeed keeps in
    ``mp_rank_00_model_states.pt`` at ZeRO 0-2 (fp32: bf16 runs through autocast), buffers and
    the key encoder included. (DeepSpeed's zero_to_fp32 gives the same trainable weights from the
    ZeRO partitions.)"""
    ckdir, tag = resolve_checkpoint(path)
    model_file = ckdir / tag / MODEL_STATES
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


# --------------------------------------------------------------------------- safe loading
def _deepspeed_safe_globals() -> list:
    """DeepSpeed classes found in its ZeRO optimizer state files: plain data, no code on load."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        out = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return out


def _unsafe_message(path, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    unsafe = ""
    if "Unsupported global" in str(e) or "weights_only" in str(e).lower():
        unsafe = " It holds objects other than tensors and plain values, which mohico never loads (only " \
                 "tensors are safe to load from an untrusted file); it was not written by mohico."
    return f"{path}: cannot load ({type(e).__name__}: {first[:300]}).{unsafe}"


@contextlib.contextmanager
def only_safe_torch_loads():
    """Inside: every ``torch.load`` (DeepSpeed's, which asks for ``weights_only=False``, included)
    is ``weights_only=True`` with only DeepSpeed's plain classes allowed; a file holding anything
    else raises MohicoError naming it, and nothing in it runs. Not thread-safe (it swaps
    ``torch.load``): use it around one loading call."""
    import pickle

    import torch

    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise MohicoError(_unsafe_message(f, e)) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def safe_load(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, containers and plain Python
    values (plus DeepSpeed's optimizer-state classes) only. Raises MohicoError naming the file
    when it is unreadable or holds anything else (e.g. pickled code)."""
    import torch

    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, or refused globals
        raise MohicoError(_unsafe_message(path, e)) from None
