"""Typed experiment configs: one dataclass per component, loaded from YAML with OmegaConf.

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["optim.lr=0.02"])

A YAML file may inherit from others with a top-level ``defaults:`` list (paths relative to
the file); later files and then the command-line overrides win. YAML is parsed with
OmegaConf's safe loader, ``${...}`` interpolations are resolved, and the result is checked
against the dataclasses below: an unknown key or a wrong type fails with a
:class:`ConfigError` naming the key, the file that set it and the closest valid key.
Cross-field rules (per-method defaults, the MAL/ZeRO-3 restriction, ...) are checked in
:func:`mohico.config_validate.validate`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from mohico.config_load import build, check_keys, collect, mapping_fields_set, packaged_fallback
from mohico.config_secrets import env_expressions, keep_env_expressions, redact_env
from mohico.config_validate import validate
from mohico.errors import ConfigError
from mohico.utils import atomic_write_text


# --------------------------------------------------------------------------- components
@dataclass
class RunConfig:
    dir: str = "runs/default"          # checkpoints, resolved config, W&B files and logs live here
    name: str = ""                     # human name (defaults to the directory's basename)


@dataclass
class AugmentConfig:
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # b, c, s, hue
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    flip_prob: float = 0.5


@dataclass
class DataConfig:
    shards: str = ""                   # brace pattern, directory or file list of shard tars
    allow_commands: bool = False       # let shard URLs run shell commands (webdataset's pipe:...); off:
                                       # a shard list (a file anyone may edit) must not run code
    batch_size: int = 8                # videos per rank per step
    num_workers: int = 2               # loader worker processes per rank
    shuffle_buffer: int = 64           # samples held for shuffling (entries: a video read R times is R entries)
    samples_per_read: int = 8          # R: independent samples (views, crops, augmentations) per video read
    seconds_per_sample: float = 60.0   # > 0: a video of D s yields min(R, ceil(D / this)); 0: always R
    resampled: bool = True             # infinite multi-epoch stream (webdataset resampling)
    clip_len: int = 16                 # frames per clip (T)
    frame_stride: int = 2              # take every n-th frame (counted at reference_fps when that is set)
    reference_fps: float = 0.0         # frame_stride counts frames at this rate, so a clip spans
                                       # (clip_len - 1) * frame_stride / reference_fps seconds on shards
                                       # of any fps (each video's stride is frame_stride * fps /
                                       # reference_fps, fractional strides take the nearest frames);
                                       # 0: frame_stride counts the shards' stored frames
    crop_size: int = 112               # output H = W
    motion_size: int = 14              # motion targets are (T, motion_size, motion_size)
    decoder: Literal["auto", "dali", "pyav"] = "auto"   # auto: DALI if the codec decodes on this device
    device: Literal["auto", "cpu", "gpu"] = "auto"
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SamplingConfig:
    # MCL motion-focused temporal sampling
    motion_prob: float = 0.7           # p of drawing the pair among clips at/above the median T-motion
    mcl_temporal: Literal["halves", "pool"] = "halves"   # MCL alone: query and key from different halves (official code); pool: one pool, with replacement
    # HiCo gradual temporal sampling
    delta: float = 1.0                 # Delta (seconds, centre to centre) reached at the end of training
    gradual: bool = True               # delta_max = progress * Delta; False: always Delta
    far_min_gap: float = 0.0           # v_k at least this many seconds from v_i (0: anywhere)
    # MCL motion-focused spatial cropping (docs/METHODS.md section 1.2)
    crop_rule: Literal["percentile", "official"] = "percentile"   # percentile: the paper's text (a share of
                                       # the cells above crop_percentile, crop_coverage); official: the released
                                       # code (the top 4 cells of a 7 x 7 grid, coverage 0.9 / 0.8 / 0.7 by size)
    crop_percentile: float = 90.0      # percentile rule only
    crop_coverage: float = 0.8         # percentile rule only
    crop_area: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_aspect: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    crop_max_sizes: int = 20
    crop_max_positions: int = 40
    motion_crop: bool = True           # False: plain random resized crop
    # shot cuts (untrimmed data)
    avoid_cuts: bool = True            # draw only clips spanning no shot cut (meta["cuts"]) when the video has any


@dataclass
class ModelConfig:
    backbone: str = "r2plus1d_18"      # a name of mohico.models.backbones.BACKBONES
    backbone_options: dict[str, Any] = field(default_factory=dict)
    proj_dim: int = 128                # contrastive embedding size
    proj_hidden: int = 0               # 0: the backbone's output size
    init: str = ""                     # 2D ImageNet ResNet-18 weights (torchvision state_dict or MoCo v2
                                       # checkpoint) inflated into r3d_18 / r2plus1d_18 when the model is
                                       # built (mohico.models.inflate); never on resume; "": random init


@dataclass
class MALConfig:
    variant: Literal["feature_map", "weighted_feature_map", "weighted_gradient_map"] = "weighted_gradient_map"
    channel_weights: Literal["global", "per_time"] = "global"   # w_c over the whole map (paper) or per time step (official code)
    st: bool = True
    s: bool = True
    t: bool = True
    time_weighting: Literal["normalized", "raw"] = "normalized"   # s_st's softmax over per-clip-normalised totals (scale-free) or raw (official code)
    warmup_weight: float = 2.0         # lambda during warm-up
    weight: float = 1.0                # lambda after
    warmup_epochs: float = 5.0
    min_cells: int = 9                 # fewer spatial cells (H' x W') in the response map: a warning that MAL
                                       # cannot tell where the motion is; configs/tiny_cpu.yaml (32-px crops, a
                                       # 2 x 2 map by design) sets 4. Only the warning: not hashed (resume-safe)


@dataclass
class MCLConfig:
    weight: float = 0.0                # 0 disables the objective
    variant: Literal["paper", "official"] = "paper"   # official: 3 positives per query + intra-video NCE
    negatives: Literal["bank", "batch"] = "bank"     # batch: SimCLR's in-batch NT-Xent, no bank, no EMA keys
    tau: float = 0.1
    tau_intra: float = 0.1             # the official variant's intra-video NCE
    momentum: float = 0.999            # EMA of the key encoder
    bn: Literal["shuffle", "sync", "none"] = "shuffle"
    mal: MALConfig = field(default_factory=MALConfig)
    mal_enabled: bool = True

    @property
    def views(self) -> int:
        """Clips per video MCL reads (not a config key): query, key (``paper``); query, the query's
        clip re-augmented and two clips of the other half (``official``)."""
        return 4 if self.variant == "official" else 2


@dataclass
class HiCoConfig:
    views: ClassVar[int] = 3           # clips per video HiCo reads: v_i, v_j, v_k (not a config key)
    weight: float = 0.0                # 0 disables the objective
    tau: float = 0.1
    visual_weight: float = 1.0
    topical_weight: float = 1.0
    focal_gamma: float = 0.5
    visual_hidden: int = 0             # hidden width of the visual and topical MLPs; 0: the backbone's output size
    use_bank: bool = True              # bank keys join the NT-Xent negatives
    momentum: float = 0.999            # EMA of the bank keys' encoder (visual head; + backbone without MCL)
    bn: Literal["shuffle", "sync", "none"] = "shuffle"   # HiCo's own EMA backbone (MCL off); sync: SyncBatchNorm everywhere


@dataclass
class ObjectivesConfig:
    mcl: MCLConfig = field(default_factory=MCLConfig)
    hico: HiCoConfig = field(default_factory=HiCoConfig)

    @property
    def enabled(self) -> tuple[str, ...]:
        """The objectives that are on (``objectives.<name>.weight > 0``), in field order (``mcl``,
        ``hico``: the registry's, mohico.models.objectives.OBJECTIVES). The one place this is
        decided; an empty tuple is refused by mohico.config_validate.check_objectives."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name).weight > 0)

    @property
    def num_views(self) -> int:
        """Clips the loader draws per video: the most any enabled objective reads (3 with HiCo,
        else 2; v_i / v_j double as MCL's query / key). The one place this number is said."""
        return max([getattr(self, name).views for name in self.enabled] or [self.mcl.views])


@dataclass
class BankConfig:
    size: int = 65536                  # K, total over all data-parallel ranks
    dim: int = 128


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.02                   # base lr (see scale_lr_with_batch)
    scale_lr_with_batch: bool = False  # lr = base * global_batch / 256 (HiCo's LARS rule), the batch counted in:
    scale_lr_unit: Literal["videos", "clips"] = "videos"   # clips: videos x clips per video (objectives.num_views,
                                       # 3 with HiCo), the official HiCo rule; videos: videos only
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False  # True: every parameter decays (MCL's official SGD); False: BN/bias exempt (HiCo, MoCo v3)
    lars_eta: float = 0.001
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.01  # warm-up starts at lr * this (unless warmup_start_lr > 0)
    warmup_start_lr: float = 0.0       # > 0: warm-up starts at this lr, as given (not scaled with the batch;
                                       # HiCo's OPTIMIZER.WARMUP_START_LR); 0: lr * warmup_start_factor
    nesterov: bool = False             # Nesterov momentum (sgd, lars; HiCo's LARS: OPTIMIZER.NESTEROV)
    min_lr: float = 1e-6               # cosine floor
    rewarm: bool = False               # a resume that raises trainer.max_steps restarts the cosine from the peak lr
                                       # (a warm restart) instead of continuing from the old schedule's lr (which,
                                       # on a finished run, is min_lr); resume-safe: give it with the new max_steps
    grad_clip: float = 0.0             # max grad norm; 0 disables


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    steps_per_epoch: int = 100         # what one "epoch" means for epoch-based schedules
    seed: int = 0
    zero_stage: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    grad_accum: int = 1
    log_every: int = 10
    deterministic: bool = False
    nproc: int = 1                     # local ranks for `mohico train` (--nproc)
    nonfinite_limit: int = 10          # NaN/inf losses skipped in a row before the run stops (exit 4)
    stall_timeout_s: float = 600.0     # no batch/step for this long: log the loader state, exit 5 (0: off)
    signal_grace_s: float = 90.0       # SIGTERM/USR1: checkpoint within this, else exit 6 unsaved (0: off)
    dist_timeout_s: float = 1800.0     # process-group timeout of one collective


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    resume: str = "auto"               # auto | never | a checkpoint path
    force: bool = False                # load a checkpoint from a different config


@dataclass
class WandbConfig:
    project: str = "mohico"
    entity: str = ""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"   # auto: offline without an API key
    image_every: int = 500
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Online kNN monitor during pretraining (mohico.trainer.online_knn), validation top-1 while fine-tuning
    (mohico.trainer.online_knn.FinetuneVal); off by default."""
    every_steps: int = 0               # 0: off; N: a kNN (fine-tuning: top-1) on val_shards every N steps (rank 0)
    val_shards: str = ""               # a small labelled shard set (folder, pattern or list file); fine-tuning: "" = finetune.test_shards
    train_shards: str = ""             # the voters; "" = val_shards itself (leave-one-out)
    labels: str = ""                   # labels file overriding the shards' (JSON {source: label} or TSV)
    k: int = 20
    temperature: float = 0.07
    clips_per_video: int = 1
    batch_size: int = 16


@dataclass
class FinetuneConfig:
    """Fine-tuning (mohico.eval.finetune): set ``backbone`` to fine-tune instead of pretraining."""
    backbone: str = ""                 # "": pretrain; a run dir / checkpoint / backbone file / torchvision file / "random"
    labels: str = ""                   # labels file overriding the shards' (JSON {source: label} or TSV)
    num_classes: int = 0               # 0: from the train shards' labels
    dropout: float = 0.5
    label_smoothing: float = 0.0
    test_shards: str = ""              # multi-clip test accuracy after the last step ("" = none)
    test_clips: int = 10
    test_crops: int = 3
    test_batch_size: int = 8


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0            # 0: one task per GPU
    cpus_per_task: int = 0             # 0: what the partition's nodes offer per task (sinfo)
    time: str = "24:00:00"
    signal_seconds: int = 120          # USR1 this long before the time limit
    extra_sbatch: list[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def keeps_bank(self, objective: str) -> bool:
        """Whether objective ``objective`` (``mcl`` or ``hico``, on or off) keeps a memory bank of
        ``bank.size`` keys: MCL unless its negatives are in-batch (``objectives.mcl.negatives=batch``;
        with a bank it needs ``bank.size > 0``, mohico.config_validate.check_objectives), HiCo with
        ``objectives.hico.use_bank`` and ``bank.size > 0``. The one place this is said: the
        objectives build their banks by it and ``mohico train --dry-run`` sizes them."""
        if objective == "mcl":
            return self.objectives.mcl.negatives == "bank"
        if objective == "hico":
            return self.objectives.hico.use_bank and self.bank.size > 0
        raise KeyError(f"no objective {objective!r} (objectives: mcl, hico)")

    @property
    def bank_objectives(self) -> tuple[str, ...]:
        """The enabled objectives that keep a memory bank (:meth:`keeps_bank`), in registry order."""
        return tuple(name for name in self.objectives.enabled if self.keeps_bank(name))


# --------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (with its ``defaults:`` chain), apply dotted ``overrides``, validate.

    ``path=None`` starts from the dataclass defaults. Raises :class:`ConfigError`.
    """
    from omegaconf import OmegaConf

    sources: list[tuple[str, dict]] = []          # (origin, plain dict) in merge order
    if path is not None:
        collect(packaged_fallback(Path(path)), sources)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=0.02")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except Exception as e:  # noqa: BLE001 - omegaconf raises several types
            raise ConfigError(f"command-line overrides: {e}") from None
        sources.append(("command line", OmegaConf.to_container(dot, resolve=False)))
    for origin, data in sources:
        check_keys(data, Config, (), origin)
    try:
        merged = OmegaConf.merge(*[OmegaConf.create(d) for _, d in sources]) if sources else OmegaConf.create({})
        if overrides:   # `model.backbone_options={}` replaces the mapping (a merge would keep the old keys);
            # `model.backbone_options.width=4` sets one entry (the dotlist cannot tell the two apart)
            whole = {item.split("=", 1)[0].strip() for item in overrides}
            for dotted, value in mapping_fields_set(sources[-1][1], Config):
                if dotted in whole:
                    OmegaConf.update(merged, dotted, value, merge=False)
        plain = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: {e}") from None
    cfg = build(Config, plain, (), sources)
    validate(cfg)
    keep_env_expressions(cfg, env_expressions(OmegaConf.to_container(merged, resolve=False)))
    return cfg


# --------------------------------------------------------------------------- saving
def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Keys a resumed run may change (allowed and logged at resume): they do not alter the training
# trajectory so far. ``trainer.max_steps`` re-plans the lr schedule and the progress from the
# current step (mohico.trainer.optim.SchedulePlan); ``data.shards`` may move when the shards'
# manifest checksum is unchanged (mohico.trainer.checkpoint.config_check); ``data.num_workers`` re-splits
# the loader streams. Everything else changes the trajectory and is hashed.
RESUME_SAFE_KEYS = ("run", "wandb", "slurm", "checkpoint", "eval", "finetune.test_shards", "finetune.test_clips",
                    "finetune.test_crops", "finetune.test_batch_size", "trainer.log_every", "trainer.nproc",
                    "trainer.max_steps", "data.num_workers", "data.shards", "data.allow_commands", "trainer.nonfinite_limit",
                    "trainer.stall_timeout_s", "trainer.signal_grace_s", "trainer.dist_timeout_s",
                    "objectives.mcl.mal.min_cells", "optim.rewarm")


def to_saved_dict(cfg: Config) -> dict:
    """:func:`to_dict` as written to disk and W&B: ``${oc.env:...}`` values keep their expression."""
    return redact_env(cfg, to_dict(cfg))


def is_resume_safe(dotted: str) -> bool:
    """True for a dotted key under one of :data:`RESUME_SAFE_KEYS`."""
    return any(dotted == k or dotted.startswith(k + ".") for k in RESUME_SAFE_KEYS)


def trajectory_dict(d: dict) -> dict:
    """A :func:`to_dict` copy without the :data:`RESUME_SAFE_KEYS`: what the hash guards."""
    out = json.loads(json.dumps(d))
    for key in RESUME_SAFE_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_hash(cfg: Config) -> str:
    """Hash of what changes the training trajectory (everything but :data:`RESUME_SAFE_KEYS`)."""
    blob = json.dumps(trajectory_dict(to_dict(cfg)), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    from omegaconf import OmegaConf


    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(to_saved_dict(cfg))))


def config_text(cfg: Config) -> str:
    """The resolved config as YAML for the log, compact (a mapping of scalars on one flow-style line),
    ``${oc.env:...}`` values as their expressions (:func:`to_saved_dict`)."""
    import yaml

    return yaml.safe_dump(to_saved_dict(cfg), default_flow_style=None, sort_keys=False, width=120)


def config_from_dict(data: dict, origin: str = "dict") -> Config:
    """Rebuild a validated Config from :func:`to_dict` output (e.g. a checkpoint's copy)."""
    check_keys(data, Config, (), origin)
    cfg = build(Config, data, (), [(origin, data)])
    validate(cfg)
    return cfg
