"""DeepSpeed ZeRO 1/2's global gradient norm in one fused call instead of one per parameter.

    fuse_grad_norm(engine.optimizer)          # after deepspeed.initialize, ZeRO 1/2

DeepSpeed computes the gradients' global 2-norm at every optimizer step (``optim/grad_norm``; a
non-finite norm skips the step; with ``optim.grad_clip`` it scales the update) in
``get_grad_norm_direct``: a Python loop over the partition's gradients, each copied to fp64 and
reduced on its own (84 tensors for configs/tiny_cpu.yaml's model, ~3 ms a step on a loaded CPU). Here the
same sum is one ``torch._foreach_norm(grads, 2, dtype=fp64)``: each tensor's norm accumulated in
fp64 without the copy, then, as DeepSpeed does, stacked, squared, summed, cast to fp32,
all-reduced over the data-parallel group and square-rooted, a NaN/inf norm masked to -1. On the
CPU the per-tensor norms are bitwise DeepSpeed's (tests/test_trainer_parts.py); on CUDA the
fused kernel may round the norm's last bits differently. Another norm type, model or pipeline
parallelism go to DeepSpeed's own loop.
"""
from __future__ import annotations

import torch


def fuse_grad_norm(zero_optimizer) -> None:
    """Replace ``zero_optimizer.get_grad_norm_direct`` (a DeepSpeed ZeRO 1/2 optimizer) by the fused form."""
    original = zero_optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        from deepspeed import comm as ds_dist
        from deepspeed.comm import pg_utils
        from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
        from deepspeed.runtime.zero.utils import get_norm_dtype

        opt = zero_optimizer
        if (float(norm_type) != 2.0 or getattr(opt, "model_parallel_rank", 0) != 0
                or pg_utils.is_parallel(getattr(opt, "model_parallel_group", None))
                or any(getattr(p, "ds_pipe_replicated", False) for p in params)):
            return original(gradients, params, norm_type)
        grads = [g.data.detach() for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)),
                                                 params)]
        if grads:
            total = torch.stack(torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())).pow(2.0).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32).to(opt.device)
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=opt.dp_process_group)
        total = total.pow(1.0 / 2.0)
        mask_nan_or_inf_with_val_inplace(total, device=opt.device)
        return total

    zero_optimizer.get_grad_norm_direct = get_grad_norm_direct
