"""What `mohico train --dry-run` and `mohico submit --dry-run` check beyond the config's own rules
(issues 28, 30): what a real run would trip over after its start-up (on SLURM: after the queue),
said in a second, before any rank, process group or DeepSpeed starts. Each check calls the rule
start-up applies; nothing is written, no video decoded (tar headers, json members, manifests).

    lines, errors = dry_run_checks(cfg, world, local)   # lines for stderr; errors: ConfigError messages
    refuse(errors)                                      # raises one ConfigError (exit 2) naming them all

- the memory banks' size per rank (:func:`bank_bytes_per_rank`): always shown; a warning above
  :data:`BANK_WARN_BYTES`, an error when the local ranks' banks exceed this machine's memory
  (every bank is allocated in host memory, then moves to its rank's GPU);
- ``model.init``'s file, read as a fresh run reads it;
- ``data.shards``: the pattern expands to files (:func:`~mohico.datasets.load.pipeline_stream.expand_shards`),
  which are tars with usable samples (:func:`~mohico.datasets.load.loader_checks.shards_content_problem`),
  of a resolution the crops need and with a sample for every loader stream of ``world`` ranks
  (:func:`~mohico.datasets.load.loader_checks.loader_start_problems`, what the loader checks at
  start), and videos as long as a clip's span (:func:`~mohico.datasets.load.shard_geometry.clip_length_problem`);
- where the run would resume from (a ``latest`` of any bytes read safely), and whether that
  checkpoint's layout and config allow it (:func:`mohico.trainer.checkpoint.layout.check_format`,
  :func:`mohico.trainer.checkpoint.config_check.check_config`, as the resume checks them);
- W&B: an online mode without an API key (:func:`mohico.trainer.wandb_mode.mode_problem`);
- ``run.dir`` can be created and written (:func:`mohico.utils.unwritable_dir`, the run lock's rule).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

GiB = 2 ** 30
BANK_WARN_BYTES = 1 * GiB      # the papers' 65536-131072 keys x 128 take 32-64 MiB per bank


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None if unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def bank_bytes_per_rank(cfg, world: int) -> tuple[int, list[str]]:
    """``(bytes, names)``: the memory banks one rank of ``world`` holds (``bank.size / world``
    keys of ``bank.dim`` float32 plus an int64 video id each) and whose banks they are."""
    names = [{"mcl": "MCL", "hico": "HiCo"}[n] for n in cfg.bank_objectives]
    if not names:
        return 0, []
    per_bank = -(-int(cfg.bank.size) // max(int(world), 1)) * (int(cfg.bank.dim) * 4 + 8)
    return per_bank * len(names), names


def check_bank(cfg, world: int, local: int, on_this_machine: bool = True) -> tuple[str, str | None, str | None]:
    """``(info line, warning or None, error or None)`` for the banks of ``world`` ranks, ``local``
    of them on one machine: this one unless ``on_this_machine`` is False (a SLURM job's node,
    whose memory is not known here: no error)."""
    need, names = bank_bytes_per_rank(cfg, world)
    if not names:
        return "bank: none", None, None
    what = (f"bank.size={cfg.bank.size} keys x bank.dim={cfg.bank.dim} in {len(names)} bank(s) "
            f"({', '.join(names)}) need {_size(need)} per rank at {world} rank(s)")
    mem = host_memory() if on_this_machine else None
    if mem is not None and need * local > mem:
        return f"bank: {what}", None, (
            f"'bank.size': {what} ({local} local ranks: {_size(need * local)} on this machine), more than its "
            f"{_size(mem)} of memory (each bank is allocated in host memory, then moves to its rank's GPU). Lower "
            f"bank.size: the papers use 65536-131072 keys ({_size(65536 * (cfg.bank.dim * 4 + 8))}-"
            f"{_size(131072 * (cfg.bank.dim * 4 + 8))} per bank on one rank)")
    if need > BANK_WARN_BYTES:
        return f"bank: {what}", (f"'bank.size': {what}: check that it fits next to the model and the activations "
                                 f"on each GPU (the papers use 65536-131072 keys)"), None
    return f"bank: {what}", None, None


def resume_target(cfg) -> tuple[str, tuple[Path, str] | None]:
    """``(line, (checkpoints dir, tag) or None)``: where the run would resume from, said as a line,
    and the checkpoint (reads ``latest`` as :func:`mohico.checkpoint_read.read_latest` does; the
    choice among damaged ones, which needs every file's sha256, is left to the run)."""
    from mohico.checkpoint_read import TAG_RE, complete_tags, read_latest, resolve_checkpoint
    from mohico.errors import MohicoError

    if cfg.checkpoint.resume == "never":
        return "start fresh (checkpoint.resume=never)", None
    if cfg.checkpoint.resume != "auto":
        try:
            return f"resume from {cfg.checkpoint.resume}", resolve_checkpoint(cfg.checkpoint.resume)
        except MohicoError as e:
            return f"resume from {cfg.checkpoint.resume} ({e})", None
    ckdir = Path(cfg.run.dir) / "checkpoints"
    latest, tags = read_latest(ckdir), complete_tags(ckdir)
    if latest is not None and not TAG_RE.match(latest):
        return (f"resume from the newest intact checkpoint ({ckdir / 'latest'} names {latest[:80]!r}, which is not a "
                f"checkpoint tag: ignored; complete checkpoints: {tags[-1] if tags else 'none'})",
                (ckdir, tags[-1]) if tags else None)
    if latest is None:
        return (f"resume from {ckdir / tags[-1]}", (ckdir, tags[-1])) if tags else ("start fresh (no checkpoint yet)", None)
    newer = [t for t in tags if t > latest]
    if newer:
        return (f"stop: {ckdir / 'latest'} names {latest} but newer checkpoints exist ({', '.join(newer)}); the "
                f"run refuses to resume until checkpoint.resume names one"), None
    return f"resume from {ckdir / latest}", (ckdir, latest)


def resume_line(cfg) -> str:
    """Where the run would resume from (:func:`resume_target`'s line)."""
    return resume_target(cfg)[0]


def resume_problem(cfg) -> str | None:
    """Why the checkpoint the run would resume from refuses this config (its layout, or a config
    whose differences change the trajectory: exactly the resume's refusal), or why
    ``checkpoint.resume=never`` may not start fresh in run.dir; None if neither."""
    from mohico.checkpoint_read import META, read_meta, resolve_checkpoint
    from mohico.errors import MohicoError
    from mohico.trainer.checkpoint.config_check import check_config, data_fingerprint
    from mohico.trainer.checkpoint.layout import check_format, fresh_start_problem

    if cfg.checkpoint.resume == "never":
        return fresh_start_problem(Path(cfg.run.dir) / "checkpoints", cfg.checkpoint.force)
    if cfg.checkpoint.resume != "auto":
        try:
            resolve_checkpoint(cfg.checkpoint.resume)         # what the resume resolves first
        except MohicoError as e:
            return f"checkpoint.resume={cfg.checkpoint.resume}: {e}"
    target = resume_target(cfg)[1]
    if target is None:
        return None
    ckdir, tag = target
    try:
        meta = read_meta(ckdir, tag)
        check_format(meta, ckdir / tag / META)
        check_config(meta, cfg, ckdir / tag, cfg.checkpoint.force, data_fp=data_fingerprint(cfg.data.shards))
    except MohicoError as e:
        return str(e)
    return None


def shards_checks(cfg, world: int) -> tuple[list[str], list[str]]:
    """``(lines, errors)`` for ``data.shards`` at ``world`` ranks: they expand to files, the files
    give usable samples, the loader's start-up checks pass and the videos are as long as a clip."""
    from mohico.datasets.load.loader_checks import loader_start_problems, manifest_counts, shards_content_problem
    from mohico.datasets.shard_list import expand_shards
    from mohico.datasets.load.shard_geometry import clip_length_problem
    from mohico.errors import MohicoError

    lines, errors = [], []
    try:
        urls = expand_shards(cfg.data.shards, allow_commands=cfg.data.allow_commands)
    except MohicoError as e:          # no file to read: nothing else to check
        return [], [str(e)]
    total = manifest_counts(urls)
    lines.append(f"data.shards: {len(urls)} shard(s), " + (f"{total} samples (manifest.json)" if total is not None
                 else "no manifest.json for them all: samples per loader stream not counted"))
    problem = shards_content_problem(urls)
    if problem is not None:
        level, msg = problem
        if level == "error":              # nothing to read: the other checks would only repeat it
            return lines, [msg]
        lines.append(f"warning: {msg}")
    errors.extend(loader_start_problems(cfg, urls, world))
    problem = clip_length_problem(cfg.data, urls)
    if problem is not None:
        level, msg = problem
        (errors.append(msg) if level == "error" else lines.append(f"warning: {msg}"))
    return lines, errors


def dry_run_checks(cfg, world: int | None = None, local: int | None = None,
                   on_this_machine: bool = True) -> tuple[list[str], list[str]]:
    """``(lines for stderr, error messages)`` of a run of ``cfg`` at ``world`` ranks, ``local`` per
    machine (default: ``trainer.nproc``; ``on_this_machine``: see :func:`check_bank`): every check
    of this module's docstring, warnings among the lines, every certain problem among the errors."""
    from mohico.errors import MohicoError
    from mohico.trainer.wandb_mode import mode_problem
    from mohico.utils import unwritable_dir

    t0 = time.perf_counter()
    world = max(int(world or cfg.trainer.nproc), 1)
    local = max(int(local or world), 1)
    lines, errors = [], []
    info, warning, error = check_bank(cfg, world, local, on_this_machine)
    lines.append(info)
    if warning:
        lines.append(f"warning: {warning}")
    if error:
        errors.append(error)
    resume = resume_line(cfg)
    if cfg.model.init:                  # the 2D weights a fresh run inflates (read as training reads them)
        from mohico.models.inflate import read_2d_state

        if "start fresh" in resume:
            try:
                lines.append(f"model.init: {len(read_2d_state(cfg.model.init))} 2D tensors in {cfg.model.init}")
            except MohicoError as e:
                errors.append(str(e))
        else:
            lines.append("model.init: not read (a resumed run takes its checkpoint's weights)")
    shard_lines, shard_errors = shards_checks(cfg, world)
    lines.extend(shard_lines)
    errors.extend(shard_errors)
    errors.extend(p for p in (resume_problem(cfg), mode_problem(cfg.wandb.mode), unwritable_dir(cfg.run.dir, "run.dir"))
                  if p)
    lines.append(f"checked in {time.perf_counter() - t0:.2f} s: "
                 + (f"{len(errors)} problem(s)" if errors else "nothing a run would stop on"))
    return lines, errors


def refuse(errors: list[str]) -> None:
    """Raise one ConfigError (exit 2) naming every problem of ``errors``, one a line; nothing if none."""
    from mohico.errors import ConfigError

    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems a run would stop on:\n" + "\n".join(f"  - {e}" for e in errors))
