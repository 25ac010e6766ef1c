"""`mohico submit CONFIG [flags] [key=value ...]`: run `mohico train` as a SLURM job (one task per GPU)."""
from __future__ import annotations

import argparse
import shutil
import sys

from mohico.utils import atomic_write_text

HELP = "submit a training run to SLURM (requeues itself after pre-emption)"
DESCRIPTION = """\
Render slurm/pretrain.sbatch for CONFIG and submit it with sbatch; print the job id.
Overrides (key=value) may come before or after the flags. The resolved config (every override
applied) is saved as RUN_DIR/submitted/<time>/config.yaml, with submit.json beside it (the
config file, the overrides, the config hash and the code version), and every srun task runs
`python -m mohico train SNAPSHOT`: a requeued job resumes with what was submitted, whatever
happens to the YAML meanwhile. The job has --requeue, gets USR1 slurm.signal_seconds before its
time limit (the trainer checkpoints and exits 3, the job script then requeues the job once),
appends every run to RUN_DIR/slurm-JOBID.out, and resumes from the latest checkpoint. Defaults
come from the config's `slurm` section; flags override them. --cpus-per-task defaults to what the
partition's nodes offer per task (sinfo); a value no node can hold fails here.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", help="experiment YAML (e.g. configs/mcl_r2plus1d_k400.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (before or after the flags), applied to the snapshot the job trains from")
    p.add_argument("--nodes", type=int, help="nodes (default: slurm.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks per node (default: slurm.gpus_per_node; 0 on CPU-only clusters)")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node on a CPU-only cluster (default: slurm.tasks_per_node)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (default: slurm.cpus_per_task; "
                   "0 = the partition's cores per node / tasks per node)")
    p.add_argument("--time", help="wall-time limit HH:MM:SS or D-HH:MM:SS (default: slurm.time)")
    p.add_argument("--partition", help="partition (default: slurm.partition, else the cluster's default)")
    p.add_argument("--account", help="account to charge (default: slurm.account)")
    p.add_argument("--job-name", help="job name (default: run.name or the run directory's name)")
    p.add_argument("--python", help="python with mohico installed on the compute nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job script instead of submitting it (writes nothing), and check the shards, "
                        "the checkpoint it would resume, W&B and run.dir as the job's start-up would (exit 2 "
                        "naming each problem)")


def run(args) -> int:
    from mohico.config import load_config
    from mohico.launcher.partition import resolve_cpus_per_task
    from mohico.launcher.snapshot import snapshot_path, write_snapshot
    from mohico.launcher.submit import SubmitOptions, render_sbatch, run_dir_of, sbatch, tasks_per_node, validate

    cfg = load_config(args.config, args.overrides)
    opts = SubmitOptions.from_config(
        cfg.slurm, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        job_name=args.job_name, python=args.python)
    validate(opts)
    resolve_cpus_per_task(opts)
    run_dir = run_dir_of(cfg)
    snapshot = snapshot_path(run_dir)
    script = render_sbatch(cfg, snapshot, [], opts)
    if args.dry_run:
        from mohico.launcher.dry_run import dry_run_checks, refuse

        print(script, end="")
        print(f"mohico submit: dry run; a submit writes the config snapshot {snapshot}"
              + ("" if opts.cpus_per_task else " and sizes --cpus-per-task from sinfo"), file=sys.stderr)
        per_node = tasks_per_node(opts)       # the job's ranks: what its start-up checks see
        lines, errors = dry_run_checks(cfg, opts.nodes * per_node, per_node, on_this_machine=False)
        for line in lines:
            print(f"mohico submit: dry run: {line}", file=sys.stderr)
        refuse(errors)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)       # sbatch does not create the log's folder
    write_snapshot(cfg, snapshot, args.config, args.overrides)
    try:
        job = sbatch(script)
    except BaseException:
        shutil.rmtree(snapshot.parent, ignore_errors=True)   # no job: no snapshot
        raise
    atomic_write_text(run_dir / f"slurm-{job}.sbatch", script)
    print(job)
    return 0
