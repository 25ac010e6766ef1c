"""The shard URLs a shards argument names (``data.shards``, ``--train``, ``eval.val_shards``, ...):
what the loader, evaluation, fine-tuning, the encoder and the checks all expand the same way.

``shards`` is a brace pattern / ``::``-separated list (expanded by webdataset), a directory (its
``*.tar``), a text file (``.txt`` / ``.list``) listing one URL per line, or a list of any of these.
A ``pipe:`` URL is a shell command that webdataset's gopen runs: :func:`expand_shards` refuses it
(a shard list could run anything) unless ``allow_commands`` (``data.allow_commands=true``).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence, Union

from mohico.errors import ConfigError


def runs_command(url: str) -> bool:
    """True for a URL that webdataset's ``gopen`` opens by running it as a shell command
    (``pipe:...``, also after its ``GOPEN_REWRITE`` rewriting, any letter case)."""
    import importlib
    from urllib.parse import urlparse

    wg = importlib.import_module("webdataset.gopen")   # the module (the package's `gopen` is the function)

    for u in (url, wg.rewrite_url(url)):
        scheme = urlparse(u).scheme
        if u.lower().startswith("pipe:") or wg.gopen_schemes.get(scheme) is wg.gopen_pipe:
            return True
    return False


def expand_shards(shards: Union[str, os.PathLike, Sequence], allow_commands: bool = False) -> list[str]:
    """Expand patterns, directories and list files into a list of shard URLs (order kept).

    A URL that would run a shell command (``pipe:``, :func:`runs_command`) raises ConfigError
    naming it, where it came from and ``data.allow_commands``, unless ``allow_commands``."""
    from webdataset.shardlists import expand_urls

    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls: list[str] = []
    for item in items:
        item = str(item)
        if not item.strip():          # (Path("") is the current folder)
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(glob.glob(str(p / "*.tar")))
            if not found:
                raise ConfigError(f"data.shards: directory {item} holds no *.tar shards")
            new = found
        elif p.is_file() and p.suffix in (".txt", ".list"):
            new = [line.strip() for line in p.read_text(errors="backslashreplace").splitlines()
                   if line.strip() and not line.startswith("#")]
        else:
            new = expand_urls(item)
        commands = [u for u in new if runs_command(u)]
        if commands and not allow_commands:
            where = f"the shard list {item}" if p.is_file() else f"the pattern {item!r}"
            raise ConfigError(
                f"data.shards: {commands[0]!r} (from {where}; {len(commands)} such URL(s)) is a command: "
                f"webdataset would run it in a shell to read the shard. mohico runs no command from a shard "
                f"list unless data.allow_commands=true: set it only for shard lists you wrote or trust, or "
                f"give the shards as files, a folder or http(s) URLs.")
        urls.extend(new)
    if not urls:
        raise ConfigError("data.shards: no shards given: set data.shards to the folder `mohico shards` wrote "
                          "(or a brace pattern, or a list file of shard URLs)")
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not Path(u).exists():
            raise ConfigError(f"data.shards: shard {u} does not exist (check the pattern/folder)")
    return urls
