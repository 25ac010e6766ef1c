"""The world-size conversion: DeepSpeed's universal checkpoint form for ZeRO 1/2 checkpoints of any
optimizer, which DeepSpeed re-partitions for the new world size.

    engine_dir, tag = universal_form(ckdir, tag, rank)    # collective; rank 0 converts once
    write_universal(src_folder, out_folder)               # the conversion itself

(The per-rank states convert themselves: each one's ``reshard``, :mod:`mohico.trainer.states`.)"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from mohico import dist
from mohico.checkpoint_read import safe_load
from mohico.errors import MohicoError
from mohico.trainer.checkpoint.layout import TMP_PREFIX
from mohico.utils import atomic_write_text

log = logging.getLogger("mohico.trainer")


def universal_form(ckdir: Path, tag: str, rank: int) -> tuple[Path, str]:
    """``(dir, tag)`` of the universal form of ZeRO 1/2 checkpoint ``ckdir/tag``, for loading at
    another world size (collective; rank 0 converts once into ``<ckdir>/universal/<tag>``)."""
    out_root = Path(ckdir) / "universal"
    out = out_root / tag
    error = ""
    if rank == 0 and not (out / "zero").is_dir():
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


def write_universal(src: Path, out: Path) -> None:
    """Write ZeRO 1/2 checkpoint folder ``src`` in DeepSpeed's universal form to ``out``.

    DeepSpeed's ``ds_to_universal`` only knows Adam's state (``exp_avg``, ``exp_avg_sq``); this
    writes whatever state the optimizer has (SGD/LARS ``momentum_buffer``, AdamW's moments,
    ``step``): per parameter, ``zero/<name>/<state>.pt`` = ``{"param": full tensor}``, rebuilt by
    concatenating every rank's fragment in rank order; DeepSpeed's universal loader reads any
    state names and re-partitions them for the new world size. Frozen parameters and buffers
    come from the module state as ``fp32.pt`` as DeepSpeed does.
    """
    src, out = Path(src), Path(out)
    model = safe_load(src / "mp_rank_00_model_states.pt")
    files = sorted(src.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    if not files:
        raise MohicoError(f"{src}: no ZeRO optimizer partitions (zero_pp_rank_*_mp_rank_00_optim_states.pt)")
    ranks = [safe_load(f)["optimizer_state_dict"] for f in files]
    zero = out / "zero"
    for g, shapes in enumerate(model["param_shapes"]):
        for name, shape in shapes.items():
            pieces: dict[str, list] = {}
            step = None
            for sd in ranks:
                frag = sd["param_slice_mappings"][g].get(name)
                if frag is None:
                    continue
                flat = {"fp32": sd["single_partition_of_fp32_groups"][g]}
                for key, value in sd["base_optimizer_state"]["state"].get(g, {}).items():
                    if key == "step":
                        step = value
                    elif torch.is_tensor(value) and value.ndim == 1 and value.numel() >= frag.start + frag.numel:
                        flat[key] = value      # flat state of this partition (may carry padding)
                for key, value in flat.items():
                    pieces.setdefault(key, []).append(value.narrow(0, frag.start, frag.numel))
            (zero / name).mkdir(parents=True, exist_ok=True)
            for key, parts in pieces.items():
                full = torch.cat(parts).view(shape).clone()
                torch.save({"param": full}, zero / name / f"{key}.pt")
            if step is not None:
                torch.save(step, zero / name / "step.pt")
    first = ranks[0]   # optimizer-wide state (clip, loss scale, param groups) as ds_to_universal writes it
    glob_state = {k: v for k, v in first.items()
                  if k not in ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")}
    glob_state["param_groups"] = first["base_optimizer_state"]["param_groups"]
    zero.mkdir(parents=True, exist_ok=True)
    torch.save(glob_state, zero / "optimizer_state.pt")
    for name, tensor in model["module"].items():   # frozen parameters (key encoder), buffers
        if not (zero / name / "fp32.pt").exists():
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save({"param": tensor.float()}, zero / name / "fp32.pt")
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    model.setdefault(UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    torch.save(model, out / "mp_rank_00_model_states.pt")
