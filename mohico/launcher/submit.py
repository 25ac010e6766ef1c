"""Render ``slurm/pretrain.sbatch`` for a config and submit it with sbatch.

    opts = SubmitOptions(nodes=2, gpus_per_node=8, time="24:00:00", partition="gpu")
    script = render_sbatch(cfg, "configs/x.yaml", ["optim.lr=0.1"], opts)
    job_id = sbatch(script)

The rendered script differs from the template only in its ``#SBATCH`` lines and in the
block marked "rendered by mohico submit" (the config, overrides, python and working
directory); the template documents both and stays usable by hand.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mohico.errors import MohicoError, UsageError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "pretrain.sbatch"   # in the wheel too (package data)
RENDER_BEGIN = "# ---- rendered by mohico submit"
RENDER_END = "# ---- end of rendered block ----"
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")


@dataclass
class SubmitOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0            # 0: one task per GPU
    cpus_per_task: int = 0             # 0: what the partition offers (launcher.partition)
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    signal_seconds: int = 120
    job_name: str = ""
    python: str = sys.executable
    extra_sbatch: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, slurm, **overrides) -> "SubmitOptions":
        """Defaults from ``cfg.slurm``; ``None`` values in ``overrides`` keep them."""
        base = cls(nodes=slurm.nodes, gpus_per_node=slurm.gpus_per_node, tasks_per_node=slurm.tasks_per_node,
                   cpus_per_task=slurm.cpus_per_task, time=slurm.time, partition=slurm.partition,
                   account=slurm.account, signal_seconds=slurm.signal_seconds,
                   extra_sbatch=list(slurm.extra_sbatch))
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base


def parse_time(value: str) -> int:
    """SLURM wall time ``HH:MM:SS`` or ``D-HH:MM:SS`` -> seconds; :class:`UsageError` if malformed."""
    m = _TIME_RE.match(value.strip())
    if not m:
        raise UsageError(f"--time {value!r}: expected HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00 or 2-00:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    if minutes >= 60 or seconds >= 60 or (m.group(1) and hours >= 24):
        raise UsageError(f"--time {value!r}: minutes and seconds must be < 60 (and hours < 24 after a day count)")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UsageError(f"--time {value!r}: the time limit must be positive")
    return total


def validate(opts: SubmitOptions) -> None:
    """Check the options; :class:`UsageError` (exit 2) names the flag and the fix."""
    if opts.nodes < 1:
        raise UsageError(f"--nodes {opts.nodes}: must be >= 1")
    if opts.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node {opts.gpus_per_node}: must be >= 0 (0 on CPU-only clusters)")
    if opts.tasks_per_node < 0:
        raise UsageError(f"--tasks-per-node {opts.tasks_per_node}: must be >= 0 (0: one task per GPU)")
    if opts.gpus_per_node > 0 and opts.tasks_per_node not in (0, opts.gpus_per_node):
        raise UsageError(f"--tasks-per-node {opts.tasks_per_node} with --gpus-per-node {opts.gpus_per_node}: "
                         f"mohico runs one task (rank) per GPU; drop --tasks-per-node, or use "
                         f"--gpus-per-node 0 on a CPU-only cluster")
    if opts.gpus_per_node == 0 and opts.tasks_per_node == 0:
        raise UsageError("--gpus-per-node 0 needs --tasks-per-node T (ranks per node on a CPU-only cluster)")
    if opts.cpus_per_task < 0:
        raise UsageError(f"--cpus-per-task {opts.cpus_per_task}: must be >= 1 (or 0: what the partition offers)")
    limit = parse_time(opts.time)
    if not 0 < opts.signal_seconds <= 65535:
        raise UsageError(f"slurm.signal_seconds={opts.signal_seconds}: must lie in 1..65535")
    if opts.signal_seconds >= limit:
        raise UsageError(f"--time {opts.time} is not longer than the pre-timeout signal "
                         f"(slurm.signal_seconds={opts.signal_seconds}): raise --time or lower slurm.signal_seconds")
    for name, value in (("--partition", opts.partition), ("--account", opts.account), ("job name", opts.job_name)):
        if value and not re.fullmatch(r"[\w.,+-]+", value):
            raise UsageError(f"{name} {value!r}: only letters, digits and . , + - _ are allowed")
    for line in opts.extra_sbatch:
        if not line.startswith("--") or "\n" in line:
            raise UsageError(f"slurm.extra_sbatch entry {line!r}: each must be one sbatch option starting with "
                             f"'--', e.g. '--mem=200G' or '--constraint=h100'")


def check_sbatch_path(name: str, value: str) -> None:
    """A path written into an ``#SBATCH`` line: a newline would start a shell line of the job
    script, ``#`` and quotes break sbatch's parsing, ``%`` is a SLURM file-name pattern."""
    bad = sorted({c for c in value if c in "\n\r#%\"'" or (ord(c) < 32)})
    if bad:
        raise UsageError(f"{name} {value!r} contains {', '.join(repr(c) for c in bad)}, which cannot go into a "
                         f"#SBATCH line (a newline would inject a shell line into the job script): choose a path "
                         f"without newlines, '#', '%' or quotes")


def tasks_per_node(opts: SubmitOptions) -> int:
    return opts.tasks_per_node or opts.gpus_per_node


def sbatch_lines(opts: SubmitOptions, output: str, workdir: str) -> list[str]:
    lines = [f"--job-name={opts.job_name or 'mohico'}", f"--nodes={opts.nodes}",
             f"--ntasks-per-node={tasks_per_node(opts)}"]
    if opts.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task > 0:      # 0 (unresolved, no sinfo): SLURM's default
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    lines.append(f"--time={opts.time}")
    if opts.partition:
        lines.append(f"--partition={opts.partition}")
    if opts.account:
        lines.append(f"--account={opts.account}")
    lines += ["--requeue", f"--signal=USR1@{opts.signal_seconds}", "--open-mode=append",
              f'--output="{output}"', f'--chdir="{workdir}"', *opts.extra_sbatch]   # quoted: paths may hold spaces
    return [f"#SBATCH {line}" for line in lines]


def render_sbatch(cfg, config_path: str | os.PathLike, overrides: Sequence[str], opts: SubmitOptions,
                  workdir: Optional[str | os.PathLike] = None, template: Path = TEMPLATE) -> str:
    """The job script for ``mohico train CONFIG OVERRIDES`` with ``opts``.

    Relative paths (the config, ``run.dir``) are made absolute against ``workdir`` (default:
    the current directory), so the job does not depend on where sbatch runs.
    """
    validate(opts)
    work = Path(workdir or os.getcwd()).resolve()
    run_dir = Path(cfg.run.dir)
    run_dir = run_dir if run_dir.is_absolute() else work / run_dir
    check_sbatch_path("run.dir", str(run_dir))
    check_sbatch_path("the working directory", str(work))
    if not opts.job_name:
        opts.job_name = re.sub(r"[^\w.+-]", "_", cfg.run.name or run_dir.name) or "mohico"
    config = Path(config_path)
    config = config if config.is_absolute() else work / config
    text = template.read_text()
    lines = text.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not header or RENDER_BEGIN not in text or RENDER_END not in text:
        raise MohicoError(f"{template}: not a mohico sbatch template (needs #SBATCH lines and the "
                          f"'{RENDER_BEGIN}' ... '{RENDER_END}' block)")
    out = lines[:header[0]] + sbatch_lines(opts, str(run_dir / "slurm-%j.out"), str(work))
    out += [line for line in lines[header[0]:] if not line.startswith("#SBATCH")]
    begin = next(i for i, line in enumerate(out) if line.startswith(RENDER_BEGIN))
    end = next(i for i, line in enumerate(out) if line.startswith(RENDER_END))
    block = [out[begin],
             "set -- " + " ".join(shlex.quote(a) for a in [str(config), *overrides]),
             f"export MOHICO_PYTHON={shlex.quote(opts.python)}",
             f"export MOHICO_WORKDIR={shlex.quote(str(work))}"]
    out = out[:begin] + block + out[end:]
    return "\n".join(out) + "\n"


def run_dir_of(cfg, workdir: Optional[str | os.PathLike] = None) -> Path:
    run_dir = Path(cfg.run.dir)
    return run_dir if run_dir.is_absolute() else Path(workdir or os.getcwd()).resolve() / run_dir


def sbatch(script: str, sbatch_exe: str = "sbatch") -> str:
    """Submit ``script`` (on stdin) and return the job id (``sbatch --parsable``)."""
    exe = shutil.which(sbatch_exe)
    if exe is None:
        raise MohicoError("sbatch is not on PATH: run `mohico submit` on a SLURM login node "
                          "(or use --dry-run to print the job script)")
    try:
        res = subprocess.run([exe, "--parsable"], input=script, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise MohicoError("sbatch did not answer within 120 s (is slurmctld up? try `sinfo`)") from None
    if res.returncode != 0:
        raise MohicoError(f"sbatch failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    job = res.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise MohicoError(f"sbatch printed no job id: {res.stdout.strip()!r} {res.stderr.strip()!r}")
    return job
