"""Optimizers (SGD with momentum, AdamW, LARS) and the warm-up + cosine learning-rate schedule.

The optimizers are plain ``torch.optim`` optimizers handed to DeepSpeed with
``zero_allow_untested_optimizer`` (DeepSpeed's own fused Adam JIT-compiles for ~60 s on CPU).

Parameter groups: weights with ``ndim >= 2`` get weight decay (and LARS' layer-wise adaptation);
biases and normalisation parameters (``ndim <= 1``) get neither, as in solo-learn / MoCo v3 and
HiCo's official code -- unless ``optim.decay_norm_and_bias`` (MCL's official code decays every
parameter: ``SGD(model.parameters(), weight_decay=1e-4)``); LARS' adaptation stays on ``ndim >= 2``.
LARS puts every parameter in its own group so that, under ZeRO 1/2 (which flattens each group
into one partition per rank), a group is still one layer: its weight and gradient norms are the
partition norms summed over the data-parallel ranks (one all-reduce per step, ``partitioned=True``).

The schedule is a pure function of the optimizer step (:func:`lr_at`), so it needs no state of
its own in a checkpoint: the trainer sets ``group["lr"] = lr_at(step) * group["lr_scale"]``
before every optimizer step.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from mohico import dist
from mohico.errors import ConfigError


# --------------------------------------------------------------------------- schedule
def base_lr(cfg, world_size: int) -> float:
    """``optim.lr``, times ``global_batch / 256`` when ``optim.scale_lr_with_batch`` (HiCo's LARS rule).

    ``global_batch`` is ``data.batch_size * trainer.grad_accum * world_size`` videos, times the clips
    each video gives (``objectives.num_views``: 3 with HiCo) under ``optim.scale_lr_unit: clips``: the
    official HiCo rule, ``BASE_LR * NUM_GPUS * BATCH_SIZE * NUM_CLIPS_PER_VIDEO / 256``
    (alibaba-mmai-research's ``models/utils/optimizer.py``, ``OPTIMIZER.ADJUST_LR``: 0.3 at 8 GPUs x 32
    videos x 3 clips gives 0.9); ``videos`` counts the videos only (0.3 there).
    """
    lr = cfg.optim.lr
    if cfg.optim.scale_lr_with_batch:
        global_batch = cfg.data.batch_size * cfg.trainer.grad_accum * world_size
        if cfg.optim.scale_lr_unit == "clips":
            global_batch *= cfg.objectives.num_views
        lr = lr * global_batch / 256.0
    return lr


def lr_at(step: int, cfg, world_size: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up from ``start`` over
    ``warmup_epochs * steps_per_epoch`` steps, then a half-cosine from ``lr`` down to ``min_lr`` at
    ``trainer.max_steps``. ``start`` is ``optim.warmup_start_lr`` as given when it is > 0 (HiCo's
    ``WARMUP_START_LR``: 0.001 whatever the batch), else ``lr * warmup_start_factor``."""
    peak = base_lr(cfg, world_size)
    o, t = cfg.optim, cfg.trainer
    warmup = int(round(o.warmup_epochs * t.steps_per_epoch))
    warmup = min(warmup, t.max_steps)
    if step < warmup:
        start = o.warmup_start_lr if o.warmup_start_lr > 0 else peak * o.warmup_start_factor
        return start + (peak - start) * step / warmup
    span = max(1, t.max_steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    floor = min(o.min_lr, peak)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


class SchedulePlan:
    """The lr schedule and the training progress, re-planned when a resume changes ``trainer.max_steps``.

    A fresh run follows :func:`lr_at` and ``progress = step / max_steps``. Resuming at step ``s``
    with another ``max_steps`` re-plans from ``s``: the lr continues from the old schedule's
    value at ``s`` (as a fraction of the peak) along a half-cosine to ``min_lr`` at the new
    ``max_steps`` (still in a warm-up that neither ``max_steps`` cuts short: the warm-up, then the
    cosine to the new ``max_steps``; a warm-up either one cuts short is not resumed); the
    progress continues from its value at ``s`` linearly to 1 at the new ``max_steps``. Nothing
    jumps — so extending a finished run trains the extra steps at ``min_lr``; ``optim.rewarm=true``
    given with the new ``max_steps`` restarts the cosine from the peak lr at ``s`` instead. The plan is saved in each checkpoint's meta (``schedule``) so chained extensions
    compose.
    """

    def __init__(self, max_steps: int, start_step: int = 0, start_progress: float = 0.0,
                 start_lr_frac: float | None = None):
        self.max_steps, self.start_step = int(max_steps), int(start_step)
        self.start_progress, self.start_lr_frac = float(start_progress), start_lr_frac

    def state_dict(self) -> dict:
        return {"max_steps": self.max_steps, "start_step": self.start_step,
                "start_progress": self.start_progress, "start_lr_frac": self.start_lr_frac}

    @classmethod
    def resume(cls, meta: dict | None, cfg, world_size: int) -> "SchedulePlan":
        """The plan for ``cfg`` resuming checkpoint ``meta`` (``None``: a fresh run)."""
        if meta is None:
            return cls(cfg.trainer.max_steps)
        saved = meta.get("schedule") or {"max_steps": (meta.get("config") or {}).get("trainer", {}).get(
            "max_steps", cfg.trainer.max_steps)}
        old = cls(**saved)
        if old.max_steps == cfg.trainer.max_steps:
            return old
        step = int(meta["step"])
        old_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=old.max_steps))
        warmup = int(round(cfg.optim.warmup_epochs * cfg.trainer.steps_per_epoch))
        old_warmup, new_warmup = min(warmup, old.max_steps), min(warmup, cfg.trainer.max_steps)
        # Inside a warm-up that both max_steps leave whole (and that no earlier re-plan replaced), the
        # same warm-up goes on; a warm-up either max_steps cuts short is not continued nor restarted:
        # the lr goes on from its value at the resume step along the cosine (README, issue 30).
        keep_warmup = old.start_lr_frac is None and step < old_warmup == new_warmup
        frac = None if keep_warmup else old.lr(step, old_cfg, world_size) / base_lr(old_cfg, world_size)
        if frac is not None and getattr(cfg.optim, "rewarm", False):
            frac = 1.0                  # optim.rewarm: the cosine restarts from the peak lr at the resume step
        return cls(cfg.trainer.max_steps, step, old.progress(step), frac)

    def progress(self, step: int) -> float:
        """Training progress in [0, 1] at ``step`` (``step / max_steps`` for a plan from step 0)."""
        span = max(1, self.max_steps - self.start_step)
        return min(1.0, max(0.0, self.start_progress + (1.0 - self.start_progress) * (step - self.start_step) / span))

    def lr(self, step: int, cfg, world_size: int) -> float:
        """The learning rate for optimizer step ``step`` (``cfg.trainer.max_steps`` is this plan's)."""
        if self.start_lr_frac is None or step < self.start_step:
            return lr_at(step, cfg, world_size)
        peak = base_lr(cfg, world_size)
        floor = min(cfg.optim.min_lr, peak)
        start = max(self.start_lr_frac * peak, floor)
        frac = min(1.0, (step - self.start_step) / max(1, self.max_steps - self.start_step))
        return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` (times each group's ``lr_scale``) into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --------------------------------------------------------------------------- LARS
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017; solo-learn's form).

    For a group with ``lars=True`` (one layer): ``trust = eta * |w| / (|g| + wd * |w| + eps)``
    (1 if either norm is 0), ``d = (g + wd * w) * trust``; groups with ``lars=False`` (biases,
    norms) use ``d = g`` with no decay. Then ``buf = momentum * buf + d``; ``w -= lr * buf``, or with
    ``nesterov`` ``w -= lr * (d + momentum * buf)`` (PyTorch's SGD form; HiCo's LARS, ``models/utils/lars.py``
    of alibaba-mmai-research/HiCo, folds the lr into ``d``, the same update at a constant lr).

    ``partitioned=True``: each group holds this rank's slice of one layer (ZeRO 1/2 flat
    partitions); the squared norms are summed over the default process group before use.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8, partitioned: bool = False, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ConfigError("'optim.nesterov': Nesterov momentum needs optim.momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, lars=True,
                        nesterov=nesterov)
        super().__init__(params, defaults)
        self.partitioned = partitioned

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        # Per-group squared norms of the weights and gradients (float64 for a stable sum).
        device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
        sq = torch.zeros(len(groups), 2, dtype=torch.float64, device=device)
        for i, group in enumerate(groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                sq[i, 0] += p.detach().double().pow(2).sum()
                sq[i, 1] += p.grad.detach().double().pow(2).sum()
        if self.partitioned:
            dist.all_reduce_(sq)
        norms = sq.sqrt().tolist()
        for (w_norm, g_norm), group in zip(norms, groups):
            wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars"]:
                    trust = 1.0
                    if w_norm > 0 and g_norm > 0:
                        trust = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    d = d.add(p, alpha=wd).mul_(trust)
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = d.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss


# --------------------------------------------------------------------------- building
def param_groups(module: torch.nn.Module, weight_decay: float, per_parameter: bool = False,
                 decay_norm_and_bias: bool = False) -> list[dict]:
    """Trainable parameters split into decayed (``ndim >= 2``) and not decayed (biases, norms);
    ``decay_norm_and_bias=True`` decays every parameter.

    ``per_parameter=True`` (LARS): one group per parameter, with ``lars`` set for ``ndim >= 2``.
    Parameters with ``requires_grad=False`` (the momentum encoder) are left out.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters (check model.* in the config)")

    def decays(p) -> bool:
        return decay_norm_and_bias or p.ndim >= 2

    if per_parameter:
        return [{"params": [p], "weight_decay": weight_decay if decays(p) else 0.0,
                 "lars": p.ndim >= 2, "name": n} for n, p in named]
    decay = [p for _, p in named if decays(p)]
    no_decay = [p for _, p in named if not decays(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg, module: torch.nn.Module, partitioned: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.name`` over ``module``'s trainable parameters.

    ``partitioned``: the engine flattens groups into per-rank partitions (ZeRO >= 1), which
    LARS must know to compute layer norms across ranks. The lr is set per step by the trainer.
    """
    o = cfg.optim
    every = o.decay_norm_and_bias
    if o.name == "sgd":
        return torch.optim.SGD(param_groups(module, o.weight_decay, decay_norm_and_bias=every), lr=o.lr,
                               momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(param_groups(module, o.weight_decay, decay_norm_and_bias=every), lr=o.lr,
                                 betas=tuple(o.betas))
    if o.name == "lars":
        return LARS(param_groups(module, o.weight_decay, per_parameter=True, decay_norm_and_bias=every), lr=o.lr,
                    momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_eta, partitioned=partitioned,
                    nesterov=o.nesterov)
    raise ConfigError(f"'optim.name': unknown optimizer {o.name!r} (sgd, adamw, lars)")
