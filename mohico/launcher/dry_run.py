"""What `mohico train --dry-run` checks beyond the config's own rules (issue 30): what a real run
would trip over after minutes of start-up, said before anything starts.

    lines, error = dry_run_checks(cfg)    # lines for stderr; error: a ConfigError message or None

- the memory banks' size per rank (:func:`bank_bytes_per_rank`): always shown; a warning above
  :data:`BANK_WARN_BYTES`, an error when the local ranks' banks exceed this machine's memory
  (every bank is allocated in host memory, then moves to its rank's GPU);
- the shards' video lengths against a clip's span (:func:`mohico.datasets.load.shard_geometry.clip_length_problem`);
- where the run would resume from (a ``latest`` of any bytes read safely).
"""
from __future__ import annotations

import os
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


def check_bank(cfg, world: int, local: int) -> tuple[str, str | None, str | None]:
    """``(info line, warning or None, error or None)`` for the banks of ``world`` ranks, ``local``
    of them on this machine."""
    need, names = bank_bytes_per_rank(cfg, world)
    if not names:
        return "bank: none", None, None
    what = (f"bank.size={cfg.bank.size} keys x bank.dim={cfg.bank.dim} in {len(names)} bank(s) "
            f"({', '.join(names)}) need {_size(need)} per rank at {world} rank(s)")
    mem = host_memory()
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


def resume_line(cfg) -> str:
    """Where the run would resume from (reads ``latest`` as :func:`mohico.checkpoint_read.read_latest` does)."""
    from mohico.checkpoint_read import TAG_RE, complete_tags, read_latest

    if cfg.checkpoint.resume == "never":
        return "start fresh (checkpoint.resume=never)"
    if cfg.checkpoint.resume != "auto":
        return f"resume from {cfg.checkpoint.resume}"
    ckdir = Path(cfg.run.dir) / "checkpoints"
    latest, tags = read_latest(ckdir), complete_tags(ckdir)
    if latest is not None and not TAG_RE.match(latest):
        return (f"resume from the newest intact checkpoint ({ckdir / 'latest'} names {latest[:80]!r}, which is not a "
                f"checkpoint tag: ignored; complete checkpoints: {tags[-1] if tags else 'none'})")
    if latest is None:
        return f"resume from {ckdir / tags[-1]}" if tags else "start fresh (no checkpoint yet)"
    newer = [t for t in tags if t > latest]
    if newer:
        return (f"stop: {ckdir / 'latest'} names {latest} but newer checkpoints exist ({', '.join(newer)}); the "
                f"run refuses to resume until checkpoint.resume names one")
    return f"resume from {ckdir / latest}"


def dry_run_checks(cfg) -> tuple[list[str], str | None]:
    """``(lines for stderr, error message or None)``: the bank's memory, the ``model.init`` file (a
    fresh run) and the clips' length against the shards' videos (warnings among the lines; the first certain problem as the error)."""
    from mohico.datasets.shard_list import expand_shards
    from mohico.datasets.load.shard_geometry import clip_length_problem
    from mohico.errors import MohicoError

    world = local = max(int(cfg.trainer.nproc), 1)
    lines, errors = [], []
    info, warning, error = check_bank(cfg, world, local)
    lines.append(info)
    if warning:
        lines.append(f"warning: {warning}")
    if error:
        errors.append(error)
    if cfg.model.init:                  # the 2D weights a fresh run inflates (read as training reads them)
        from mohico.models.inflate import read_2d_state

        if "start fresh" in resume_line(cfg):
            try:
                lines.append(f"model.init: {len(read_2d_state(cfg.model.init))} 2D tensors in {cfg.model.init}")
            except MohicoError as e:
                errors.append(str(e))
        else:
            lines.append("model.init: not read (a resumed run takes its checkpoint's weights)")
    if cfg.data.shards:
        try:
            urls = expand_shards(cfg.data.shards, allow_commands=cfg.data.allow_commands)
        except MohicoError as e:
            lines.append(f"shards not checked: {e}")
        else:
            problem = clip_length_problem(cfg.data, urls)
            if problem is not None:
                level, msg = problem
                (errors.append(msg) if level == "error" else lines.append(f"warning: {msg}"))
    return lines, (errors[0] if errors else None)
