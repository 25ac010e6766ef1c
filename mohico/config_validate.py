"""Cross-field rules of a :class:`mohico.config.Config` (per-field types and unknown keys are
checked while loading, in :mod:`mohico.config_load`); each message names the key to change.

    validate(cfg)      # raises ConfigError("'optim.lr': must be > 0")
"""
from __future__ import annotations

from mohico.config_backbones import check_backbone
from mohico.errors import ConfigError

# The rules take a ``mohico.config.Config`` without importing it: config.py imports this module
# (load_config validates), and the floors allow no import cycle (tests/test_floors.py).


def need(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("'key': msg")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"'{key}': {msg}")


def validate(cfg) -> None:
    """Rules that span fields; each message names the key to change."""
    check_bank(cfg)
    check_objectives(cfg)
    need(cfg.trainer.zero_stage in (0, 1, 2), "trainer.zero_stage",
         "must be 0, 1 or 2: MCL's motion alignment loss needs double backprop and its key encoder is an "
         "EMA of the parameters, neither of which works with ZeRO-3's parameter partitioning")
    need(cfg.trainer.max_steps > 0, "trainer.max_steps", "must be > 0")
    need(cfg.trainer.steps_per_epoch > 0, "trainer.steps_per_epoch", "must be > 0")
    need(cfg.trainer.grad_accum >= 1, "trainer.grad_accum", "must be >= 1")
    need(cfg.trainer.nproc >= 1, "trainer.nproc", "must be >= 1")
    need(cfg.trainer.nonfinite_limit >= 1, "trainer.nonfinite_limit", "must be >= 1")
    for key in ("stall_timeout_s", "signal_grace_s"):
        need(getattr(cfg.trainer, key) >= 0, f"trainer.{key}", "must be >= 0 seconds (0 turns it off)")
    need(cfg.trainer.dist_timeout_s > 0, "trainer.dist_timeout_s", "must be > 0 seconds")
    need(cfg.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    need(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: no online kNN / validation top-1)")
    ft = cfg.finetune
    need(0 <= ft.dropout < 1 and 0 <= ft.label_smoothing < 1, "finetune.dropout",
         "finetune.dropout and finetune.label_smoothing must lie in [0, 1)")
    need(ft.num_classes >= 0 and ft.test_clips >= 1 and ft.test_crops >= 1 and ft.test_batch_size >= 1,
         "finetune.test_clips", "finetune.num_classes >= 0; test_clips, test_crops, test_batch_size >= 1")
    need(cfg.eval.every_steps == 0 or bool(cfg.eval.val_shards) or bool(ft.backbone), "eval.val_shards",
         "the online kNN (eval.every_steps > 0) needs a small labelled shard set: eval.val_shards=PATH")
    need(cfg.eval.k >= 1 and cfg.eval.temperature > 0 and cfg.eval.clips_per_video >= 1 and cfg.eval.batch_size >= 1,
         "eval.k", "eval.k, eval.clips_per_video and eval.batch_size must be >= 1 and eval.temperature > 0")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1 (the latest checkpoint is always kept)")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.data.samples_per_read >= 1, "data.samples_per_read", "must be >= 1 (1: one sample per video read)")
    need(cfg.data.seconds_per_sample >= 0, "data.seconds_per_sample",
         "must be >= 0 seconds (0: every read yields data.samples_per_read samples)")
    need(cfg.data.clip_len >= 1 and cfg.data.frame_stride >= 1, "data.clip_len", "clip_len and frame_stride must be >= 1")
    need(cfg.data.reference_fps >= 0, "data.reference_fps",
         "must be >= 0 (the frame rate frame_stride counts at; 0: the shards' stored frames)")
    need(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean", "mean and std need 3 values (RGB)")
    need(len(cfg.data.augment.color_jitter) == 4, "data.augment.color_jitter", "needs 4 values: brightness, contrast, saturation, hue")
    need(len(cfg.sampling.crop_area) == 2 and 0 < cfg.sampling.crop_area[0] <= cfg.sampling.crop_area[1] <= 1,
         "sampling.crop_area", "must be [min, max] with 0 < min <= max <= 1")
    need(len(cfg.sampling.crop_aspect) == 2 and 0 < cfg.sampling.crop_aspect[0] <= cfg.sampling.crop_aspect[1],
         "sampling.crop_aspect", "must be [min, max] with 0 < min <= max")
    need(0 < cfg.sampling.crop_coverage <= 1, "sampling.crop_coverage", "must lie in (0, 1]")
    need(0 <= cfg.sampling.crop_percentile < 100, "sampling.crop_percentile", "must lie in [0, 100)")
    need(0 <= cfg.sampling.motion_prob <= 1, "sampling.motion_prob", "must lie in [0, 1]")
    need(cfg.sampling.delta > 0, "sampling.delta", "must be > 0 seconds")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.warmup_start_lr >= 0, "optim.warmup_start_lr",
         "must be >= 0 (0: the warm-up starts at optim.lr * optim.warmup_start_factor)")
    need(not cfg.optim.nesterov or (cfg.optim.name in ("sgd", "lars") and cfg.optim.momentum > 0), "optim.nesterov",
         f"Nesterov momentum needs optim.name sgd or lars and optim.momentum > 0 (got {cfg.optim.name!r}, "
         f"momentum {cfg.optim.momentum}); set optim.nesterov=false")
    need(len(cfg.optim.betas) == 2, "optim.betas", "needs 2 values")
    check_backbone(cfg.model.backbone, cfg.model.backbone_options)
    if cfg.model.init:
        need(cfg.model.backbone in ("r3d_18", "r2plus1d_18"), "model.init",
             f"inflates 2D ResNet-18 weights into model.backbone r3d_18 or r2plus1d_18; got "
             f"{cfg.model.backbone!r} (set model.init='' for a random init)")
        need(not cfg.finetune.backbone, "model.init",
             "a fine-tuning run takes its weights from finetune.backbone; set model.init='' there")


def check_objectives(cfg) -> None:
    """The objectives' rules (``objectives.*``): at least one is on (``cfg.objectives.enabled``),
    temperatures and momenta in range, the variants that go together. :func:`validate` runs it,
    and :func:`check_pretrain` for a config built in code."""
    o = cfg.objectives
    need(o.mcl.weight >= 0 and o.hico.weight >= 0, "objectives.*.weight", "weights must be >= 0 (0 disables)")
    need(bool(o.enabled), "objectives",
         "no objective is enabled: set objectives.mcl.weight or objectives.hico.weight > 0")
    for key, tau in (("mcl.tau", o.mcl.tau), ("mcl.tau_intra", o.mcl.tau_intra), ("hico.tau", o.hico.tau)):
        need(tau > 0, f"objectives.{key}", "must be > 0")
    need(not (o.mcl.variant == "official" and o.mcl.negatives == "batch"), "objectives.mcl.negatives",
         "the official variant's positives are keys of the EMA encoder against the bank; in-batch negatives "
         "(negatives=batch) go with variant=paper")
    need(not ("mcl" in o.enabled and o.mcl.variant == "official" and "hico" in o.enabled), "objectives.mcl.variant",
         "the official MCL variant reads 4 views per video (query, query re-augmented, two clips of the other half) "
         "and HiCo reads 3 others (v_i, v_j, v_k); with HiCo on use objectives.mcl.variant=paper")
    need(0.0 <= o.mcl.momentum < 1.0, "objectives.mcl.momentum", "must lie in [0, 1)")
    need(0.0 <= o.hico.momentum < 1.0, "objectives.hico.momentum", "must lie in [0, 1)")
    if "mcl" in o.enabled and o.mcl.mal_enabled:
        need(o.mcl.mal.st or o.mcl.mal.s or o.mcl.mal.t, "objectives.mcl.mal",
             "MAL is enabled but st, s and t are all false (set objectives.mcl.mal_enabled=false instead)")


def check_pretrain(cfg) -> None:
    """The rules of building the pretraining module (``PretrainModule`` runs it): the objectives'
    (:func:`check_objectives`) and MCL's bank. Not checked at load: a fine-tuning config inherits a
    pretraining config's objectives (their view count) and sets ``bank.size: 0``
    (configs/finetune_ucf101.yaml)."""
    check_objectives(cfg)
    need("mcl" not in cfg.objectives.enabled or not cfg.keeps_bank("mcl") or cfg.bank.size > 0, "bank.size",
         "MCL's NCE needs a memory bank of negatives; set bank.size > 0 (e.g. 65536) or disable MCL with "
         "objectives.mcl.weight=0")


def check_bank(cfg) -> None:
    """The memory bank's config rules (``bank.*``), run by :func:`validate`. MCL's need of a bank is
    in :func:`check_pretrain`, a bank's split over the ranks in ``mohico.models.bank.MemoryBank``
    (the world size is not in the config)."""
    need(cfg.bank.size >= 0, "bank.size", f"must be >= 0 keys (0: no bank, HiCo only), got {cfg.bank.size}")
    need(cfg.bank.dim == cfg.model.proj_dim, "bank.dim",
         f"must equal model.proj_dim ({cfg.model.proj_dim}): the bank stores projected keys")


def shuffle_buffer_advice(data) -> str | None:
    """A warning when ``data.shuffle_buffer`` (``data``: the config's ``DataConfig``) is too small
    to keep the ``data.samples_per_read`` samples of one video read out of one batch, else None.
    Not an error (a small buffer only makes it possible); the loader logs it when it is built.

    Bound: each of the <= B - 1 videos already in a batch of B has at most R - 1 entries left in
    the buffer, so a buffer of ``(B - 1) * (R - 1) + 1`` entries always holds another video
    (mohico.datasets.load.pipeline_stream)."""
    bound = (data.batch_size - 1) * (data.samples_per_read - 1) + 1
    if data.samples_per_read > 1 and data.shuffle_buffer < bound:
        return (f"data.shuffle_buffer={data.shuffle_buffer} < (batch_size - 1) * (samples_per_read - 1) + 1 = "
                f"{bound}: a video read {data.samples_per_read} times may give two samples of one batch; raise "
                f"data.shuffle_buffer to {bound} to rule it out")
    return None
