"""DeepSpeed: process group, config dict and engine for the PretrainModule.

- ZeRO stage 0, 1 or 2 from ``trainer.zero_stage`` (3 is refused while MCL's motion alignment
  loss is on: config_validate.validate).
- Precision: ``trainer.precision=auto`` is bf16 on GPU and fp32 on CPU. bf16 runs through
  DeepSpeed's ``torch_autocast`` (fp32 weights, optimizer and memory bank; bf16 matmuls and
  convolutions), because DeepSpeed's ``bf16`` mode casts the whole module, BatchNorm running
  statistics and the bank buffers included (and fails on CPU with BatchNorm: docs/DEPENDENCIES.md).
- ZeRO 1/2's per-step global gradient norm runs fused (:mod:`mohico.trainer.grad_norm`).
- Backend: NCCL with CUDA, gloo otherwise. The ``deepspeed_shm_comm`` op (used only by
  inference all-reduce) is not JIT-compiled on CPU (38-49 s the first time).
"""
from __future__ import annotations

import logging

import torch

from mohico import dist
from mohico.trainer.grad_norm import fuse_grad_norm

log = logging.getLogger("mohico.trainer")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(cfg) -> str:
    """'bf16' or 'fp32' for ``trainer.precision`` on this machine."""
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16" if device_type() == "cuda" else "fp32"
    return p


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, int]:
    """Start the process group once (plain, torchrun and SLURM environments: see
    :mod:`mohico.dist_env`; one process without any is rank 0 of 1) and return
    ``(rank, world_size, local_rank)``; ``timeout_s`` bounds every collective (trainer.dist_timeout_s)."""
    env = dist.init(timeout_s=timeout_s)
    return env.rank, env.world_size, env.local_rank


DEEPSPEED_BUCKET = 500_000_000      # DeepSpeed's reduce/allgather bucket default, in elements


def bucket_size(params: int | None) -> int:
    """ZeRO 1/2 reduce and allgather bucket size (elements) for a model of ``params`` parameters:
    ``min(5e8, params)``, aligned. DeepSpeed's 5e8 default allocates buckets sized for a 500M-parameter model
    whatever the model (the tiny model took 7.5 GiB on the first GPU run); a bucket never needs to
    hold more than every gradient once. Rounded up to a multiple of 4096: DeepSpeed asserts the
    allgather bucket is a multiple of its NCCL start alignment (2 elements on CPU/fp32, more in 16 bits)."""
    if not params:
        return DEEPSPEED_BUCKET
    return int(min(DEEPSPEED_BUCKET, -(-int(params) // 4096) * 4096))


def ds_config(cfg, world_size: int, load_universal: bool = False, params: int | None = None) -> dict:
    """The DeepSpeed config dict for ``cfg`` at ``world_size`` data-parallel ranks; ``params``: the
    model's parameter count (sizes the ZeRO buckets: :func:`bucket_size`)."""
    t = cfg.trainer
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,           # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
    if t.zero_stage in (1, 2):
        conf["zero_optimization"].update({"contiguous_gradients": True, "overlap_comm": device_type() == "cuda",
                                          "reduce_scatter": True, "allgather_partitions": True,
                                          "reduce_bucket_size": bucket_size(params),
                                          "allgather_bucket_size": bucket_size(params)})
    if resolve_precision(cfg) == "bf16":
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return conf


def build_engine(cfg, module: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
                 load_universal: bool = False):
    """``deepspeed.initialize`` around ``module`` (backbone + heads + objectives, forward returns
    the loss) with our torch optimizer. Returns the engine."""
    import deepspeed

    if device_type() == "cpu":
        dist.disable_deepspeed_shm_op()
    if device_type() == "cuda":
        module = module.cuda()
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=ds_config(cfg, world_size, load_universal,
                                                            params=sum(p.numel() for p in module.parameters())))
    if cfg.trainer.zero_stage in (1, 2) and hasattr(engine.optimizer, "get_grad_norm_direct"):
        fuse_grad_norm(engine.optimizer)      # the per-step global gradient norm in one call
    return engine
