"""`mohico train CONFIG [--nproc N] [key=value ...]`: pretrain with DeepSpeed, resuming from the
run's latest checkpoint (or fine-tune, when the config sets finetune.backbone: configs/finetune_*.yaml,
then test on finetune.test_shards).

One process per rank. Without a distributed environment, ``--nproc N`` (or ``trainer.nproc``)
starts N local ranks; under torchrun or ``srun`` (RANK / SLURM_PROCID set) this process is one
rank. Exit codes: 0 done, 1 runtime failure, 2 usage or config error, 3 checkpointed after a
preemption signal (requeue me), 4 stopped on NaN/inf losses, 5 stalled (no progress for
trainer.stall_timeout_s, or a loader worker died), 6 a signal that could not be checkpointed
within trainer.signal_grace_s (exited unsaved); with --nproc N, the code of the rank that
failed first. Resuming loads DeepSpeed's model and optimizer files with weights_only=True
(tensors and plain values only), like mohico's own files and `mohico export`.
"""
from __future__ import annotations

import argparse
import os
import sys

from mohico.errors import UsageError

HELP = "pretrain a video encoder (DeepSpeed; resumes from the run's latest checkpoint)"
DESCRIPTION = __doc__


def add_arguments(p):
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="config overrides, e.g. run.dir=runs/a trainer.max_steps=100 checkpoint.every_steps=50 "
                        "checkpoint.keep=3 trainer.seed=0 checkpoint.resume=never")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to start (default: trainer.nproc); ignored under torchrun/SLURM")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the shards, the checkpoint it would resume, W&B and run.dir as "
                        "start-up would (exit 2 naming each problem); print the resolved config and where the "
                        "run would resume from; start nothing")
    p.set_defaults(_parser=p)   # REMAINDER swallows a --help given after CONFIG: run() prints it


def _split_nproc(items: list[str]) -> tuple[list[str], int | None]:
    """``--nproc N`` / ``--nproc=N`` given after the config (argparse leaves them in the overrides)."""
    out, nproc, i = [], None, 0
    while i < len(items):
        a = items[i]
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.split("=", 1)[1] if "=" in a else (items[i + 1] if i + 1 < len(items) else "")
            i += 1 if "=" in a else 2
            try:
                nproc = int(value)
            except ValueError:
                raise UsageError(f"--nproc needs an integer, got {value!r}") from None
            continue
        if a.startswith("-"):
            from mohico.launcher.cli import unknown_option_message

            raise UsageError(unknown_option_message(a, ["--nproc", "--help"])
                             + " (overrides are key=value, e.g. trainer.max_steps=100)")
        out.append(a)
        i += 1
    return out, nproc


def _dry_run(cfg) -> int:
    """Print the resolved config (stdout) and what a real run would do (stderr): where it resumes
    from, and every check of :mod:`mohico.launcher.dry_run` (the shards, the checkpoint's config,
    W&B, run.dir, the memory banks per rank). The problems a run would certainly stop on raise one
    ConfigError (exit 2) naming them all."""
    from omegaconf import OmegaConf

    from mohico.config import to_dict
    from mohico.launcher.dry_run import dry_run_checks, refuse, resume_line

    print(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))), end="")
    print(f"mohico train: dry run: {cfg.trainer.nproc} local rank(s) (under torchrun/SLURM: one per process), "
          f"run.dir={cfg.run.dir}, {resume_line(cfg)}, {cfg.trainer.max_steps} steps", file=sys.stderr)
    lines, errors = dry_run_checks(cfg)
    for line in lines:
        print(f"mohico train: dry run: {line}", file=sys.stderr)
    refuse(errors)
    return 0


def run(args) -> int:
    from mohico.config import load_config

    if any(a in ("-h", "--help") for a in args.overrides):
        args._parser.print_help()
        return 0
    items = list(args.overrides)
    if "--dry-run" in items:             # given after CONFIG (REMAINDER keeps it among the overrides)
        items.remove("--dry-run")
        args.dry_run = True
    overrides, nproc = _split_nproc(items)
    if nproc is not None:
        args.nproc = nproc
    if args.nproc is not None:
        if args.nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
        overrides.append(f"trainer.nproc={args.nproc}")
    cfg = load_config(args.config, overrides)   # validate before starting any process
    if getattr(args, "dry_run", False):   # (eval finetune calls run() with its own namespace)
        return _dry_run(cfg)

    from mohico.launcher.spawn import should_spawn, spawn_local

    if should_spawn(cfg.trainer.nproc):
        return spawn_local(cfg.trainer.nproc, ["train", args.config, *overrides],
                           debug=bool(getattr(args, "debug", False)))

    from mohico.dist import shutdown
    from mohico.trainer.train import train

    try:
        code = train(cfg)
    finally:
        shutdown()
    return finetune_test_after(cfg, code)


def finetune_test_after(cfg, code: int) -> int:
    """After a completed fine-tuning run, rank 0 measures multi-clip test accuracy (finetune.test_shards)."""
    if code != 0 or not cfg.finetune.backbone or not cfg.finetune.test_shards or os.environ.get("RANK", "0") != "0":
        return code
    from mohico.eval.finetune import finetune_test
    from mohico.trainer.wandb_log import run_opener

    finetune_test(cfg, progress=sys.stderr.isatty(), open_run=run_opener(cfg))
    return 0
