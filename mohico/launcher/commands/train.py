"""`mohico train CONFIG [--nproc N] [key=value ...]`: pretrain with DeepSpeed, resuming from the
run's latest checkpoint.

One process per rank. Without a distributed environment, ``--nproc N`` (or ``trainer.nproc``)
starts N local ranks; under torchrun or ``srun`` (RANK / SLURM_PROCID set) this process is one
rank. Exit codes: 0 done, 1 runtime failure, 2 usage or config error, 3 checkpointed after a
preemption signal (requeue me).
"""
from __future__ import annotations

HELP = "pretrain a video encoder (DeepSpeed; resumes from the run's latest checkpoint)"
DESCRIPTION = __doc__


def add_arguments(p):
    p.add_argument("config", help="experiment YAML, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. run.dir=runs/a trainer.max_steps=100 checkpoint.every_steps=50 "
                        "checkpoint.keep=3 trainer.seed=0 checkpoint.resume=never")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to start (default: trainer.nproc); ignored under torchrun/SLURM")


def run(args) -> int:
    from mohico.config import load_config
    from mohico.errors import UsageError

    overrides = list(args.overrides)
    if args.nproc is not None:
        if args.nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
        overrides.append(f"trainer.nproc={args.nproc}")
    cfg = load_config(args.config, overrides)   # validate before starting any process

    from mohico.launcher.spawn import should_spawn, spawn_local

    if should_spawn(cfg.trainer.nproc):
        return spawn_local(cfg.trainer.nproc, ["train", args.config, *args.overrides])

    from mohico.trainer.train import shutdown, train

    try:
        return train(cfg)
    finally:
        shutdown()
