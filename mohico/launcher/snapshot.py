"""What a submitted job trains from: a snapshot of the resolved config and the code version.

    path = snapshot_path(run_dir)                  # RUN_DIR/submitted/<UTC time>-<pid>/config.yaml
    write_snapshot(cfg, path, source="configs/x.yaml", overrides=[...])

``mohico submit`` writes the resolved config (every override applied) into ``run.dir`` and the
job script runs ``mohico train SNAPSHOT``: a requeued job resumes with what was submitted,
whatever happens to the YAML files meanwhile. ``submit.json`` beside it records the config file
and overrides it came from, the config hash and the code version (mohico's version and, in a git
checkout, the commit, with ``-dirty`` when the working tree has changes).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Sequence

import mohico
from mohico.config import config_hash, save_config
from mohico.utils import atomic_write_json

PACKAGE_ROOT = Path(mohico.__file__).resolve().parent


def code_version() -> dict:
    """``{"mohico": version, "git": commit[-dirty] or None}`` of the code this process runs."""
    out = {"mohico": mohico.__version__, "git": None}
    repo = PACKAGE_ROOT.parent
    if not (repo / ".git").exists():
        return out
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=20)
            out["git"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def snapshot_path(run_dir: str | os.PathLike) -> Path:
    """A new snapshot location under ``run_dir/submitted/`` (UTC time and pid: unique per submit)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(run_dir) / "submitted" / f"{stamp}-{os.getpid()}" / "config.yaml"


def write_snapshot(cfg, path: str | os.PathLike, source: str, overrides: Sequence[str]) -> Path:
    """Write the resolved ``cfg`` to ``path`` and ``submit.json`` beside it (both atomic)."""
    path = Path(path)
    save_config(cfg, path)
    atomic_write_json(path.parent / "submit.json", {
        "config": str(source), "overrides": list(overrides), "config_hash": config_hash(cfg),
        "code": code_version(), "time": time.time()})
    return path
