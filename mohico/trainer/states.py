"""The resumable pieces of a training run, each one object with ``state_dict()`` /
``load_state_dict(state)`` (and, when it is sharded over ranks, ``reshard(old_states, step)``).

    states = {"engine": EngineState(engine, zero_stage),  # DeepSpeed's own files: weights + key encoder, optimizer
              "train": TrainState(cfg, world),            # step, schedule, W&B id, config: mohico_meta.json
              "rng": RngState(seed, rank),                # Python/NumPy/torch streams, per rank
              "loader": loader,                           # the data stream position, per rank
              "banks": BanksState(module)}                # every memory bank's shard, per rank
    checkpointer.load(states, resume); ...; checkpointer.save(states)

The checkpointer (:mod:`mohico.trainer.checkpoint`) knows nothing of what is inside them:
``"engine"`` writes its own sharded files, ``"train"`` is the checkpoint's metadata (JSON, the
same on every rank), and every other entry is saved per rank under its name. A new piece of
resumable state is one more entry in that dict.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from mohico.errors import MohicoError
from mohico.trainer.optim import SchedulePlan, base_lr
from mohico.trainer.checkpoint.config_check import data_fingerprint
from mohico.trainer.rng import RngState  # noqa: F401 - one of the states listed above
from mohico.trainer.wandb_log import new_run_id
from mohico.config import config_hash, to_saved_dict
from mohico.models.bank import MemoryBank

log = logging.getLogger("mohico.trainer")


def extension_line(plan: SchedulePlan, step: int, cfg, world_size: int) -> str:
    """What a resume that changed ``trainer.max_steps`` trains at: the lr at the resume step and at
    the end, and, when the old schedule had ended (a finished run), that it stays at ``min_lr`` and
    how to re-warm."""
    o = cfg.optim
    start, end = plan.lr(step, cfg, world_size), plan.lr(plan.max_steps, cfg, world_size)
    line = (f"trainer.max_steps -> {plan.max_steps}: steps {step}..{plan.max_steps} train at lr {start:.3g} "
            f"falling along a cosine to {end:.3g} (optim.min_lr)")
    if getattr(o, "rewarm", False):
        return line + " (optim.rewarm=true: the cosine restarted from the peak lr)"
    if start <= min(o.min_lr, base_lr(cfg, world_size)) * (1 + 1e-9):
        line += (f"; the run had finished, so its schedule ended at optim.min_lr={o.min_lr:g} and the extra "
                 f"steps stay there. To re-warm, resume with optim.rewarm=true (the cosine restarts from the "
                 f"peak lr {base_lr(cfg, world_size):.3g})")
    return line


class TrainState:
    """Where the run is: ``step``, the lr/progress ``plan`` (:class:`~mohico.trainer.optim.SchedulePlan`),
    the W&B run id; saved as the checkpoint's metadata with the world size, ZeRO stage, shards'
    fingerprint and the config (what resume checks before anything is built)."""

    def __init__(self, cfg, world_size: int):
        self.cfg, self.world_size = cfg, int(world_size)
        self.step = 0
        self.plan = SchedulePlan(cfg.trainer.max_steps)
        self.wandb_run_id = new_run_id()
        self.data_fingerprint = data_fingerprint(cfg.data.shards)

    def state_dict(self) -> dict:
        cfg = self.cfg
        return {"step": self.step, "epoch": self.step // cfg.trainer.steps_per_epoch,
                "progress": self.plan.progress(self.step), "schedule": self.plan.state_dict(),
                "data_fingerprint": self.data_fingerprint, "world_size": self.world_size,
                "zero_stage": cfg.trainer.zero_stage, "wandb_run_id": self.wandb_run_id,
                "config_hash": config_hash(cfg), "config": to_saved_dict(cfg), "time": time.time()}

    def load_state_dict(self, state: dict) -> None:
        """``state``: a checkpoint's metadata; the plan is re-planned if ``trainer.max_steps``
        changed. A checkpoint of another run directory has no ``wandb_run_id`` here (resume
        drops it): this run keeps its new id."""
        self.step = int(state["step"])
        self.plan = SchedulePlan.resume(state, self.cfg, self.world_size)
        if self.plan.start_step == self.step and self.plan.start_lr_frac is not None:
            log.info("%s", extension_line(self.plan, self.step, self.cfg, self.world_size))
        self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id


class BanksState:
    """Every memory bank of ``module`` (``module.banks()``: ``{name: MemoryBank}``, none for a
    module without banks); each rank saves its own shards."""

    def __init__(self, module):
        self.module = module

    def _banks(self) -> dict:
        return self.module.banks() if hasattr(self.module, "banks") else {}

    def state_dict(self) -> dict:
        return {name: bank.state_dict() for name, bank in self._banks().items()}

    def _matching(self, names) -> dict:
        banks = self._banks()
        if set(names) != set(banks):
            raise MohicoError(f"bank checkpoint holds banks {sorted(names)} but this model has {sorted(banks)}: "
                              f"the checkpoint is from a run with other objectives (objectives.*.weight, "
                              f"objectives.hico.use_bank); resume with the same objectives")
        return banks

    def load_state_dict(self, state: dict) -> None:
        for name, bank in self._matching(state).items():
            bank.load_state_dict(state[name])

    def reshard(self, states: list[dict], step: int) -> None:
        """Load this rank's shards from every old rank's :meth:`state_dict` (rank order) at
        this run's world size (:meth:`MemoryBank.reshard`: the keys' age order is kept)."""

        names = sorted(states[0]) if states else []
        if any(sorted(s) != names for s in states):
            raise MohicoError("the ranks' bank states hold different banks; they are not from one checkpoint")
        for name, bank in self._matching(names).items():
            bank.load_state_dict(MemoryBank.reshard([s[name] for s in states], bank.world_size)[bank.rank])


class EngineState:
    """The DeepSpeed engine: module weights (the EMA key encoder and BatchNorm statistics
    included: they are module buffers / frozen parameters) and the optimizer (ZeRO partitions
    per rank). DeepSpeed writes and reads its own sharded files; another world size loads the
    universal form made at resume (:mod:`mohico.trainer.checkpoint.universal`)."""

    def __init__(self, engine, zero_stage: int):
        self.engine, self.zero_stage = engine, int(zero_stage)

    def save(self, ckdir: Path, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(str(ckdir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckdir: Path, tag: str, saved_zero_stage) -> None:
        module_only = saved_zero_stage != self.zero_stage
        if module_only:
            log.warning("checkpoint was written at ZeRO %s, this run uses ZeRO %d: loading the weights only "
                        "(optimizer state starts fresh)", saved_zero_stage, self.zero_stage)
        from mohico.checkpoint_read import only_safe_torch_loads

        with only_safe_torch_loads():     # DeepSpeed's loader would unpickle anything: tensors and plain values only
            path, _ = self.engine.load_checkpoint(str(ckdir), tag, load_module_only=module_only,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise MohicoError(f"DeepSpeed could not load checkpoint {Path(ckdir) / tag}")
