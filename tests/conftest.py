"""Shared test setup: CPU-only environment, W&B offline, and session-wide synthetic data.

Session fixtures build data once per test run (videos, then shards) in a temp folder; tests
that need them request ``synth_videos`` or ``synth_shards``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Environment for every test (and the subprocesses they start): CPU accelerator for
# DeepSpeed, W&B offline unless told otherwise, a fixed torch-extensions cache.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "mohico" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")
# The kernel tests run Triton kernels on CPU tensors under the interpreter. Triton decides when a
# kernel module is first imported, and any test may import the kernels first, so it is set for
# the whole session; dispatch with impl=None still picks chunked PyTorch for CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Subprocesses started by tests run the console script from the same venv.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def synth_videos(tmp_path_factory) -> Path:
    """Six 8-second VP9 synthetic videos (160x120, 15 fps) with ground-truth JSON."""
    from mohico.datasets.synthetic.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, videos=6, seed=1234, codec="vp9", fps=15, size=(160, 120), duration=8.0, topics=3)
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_videos, tmp_path_factory) -> Path:
    """The synthetic videos written as WebDataset shards (2 shards, DALI index files, manifest)."""
    from mohico.datasets.write.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(synth_videos, out, codec="vp9", short_side=112, fps=15, gop=16,
                 max_shard_size=600_000, workers=1, flow="dis", progress=False)
    return out


@pytest.fixture
def demo_shards(tmp_path) -> Path:
    """tiny_cpu's ``data.shards`` (``demo/shards``) under the test's ``tmp_path``, for tests that
    stand there: shards its `--dry-run` accepts (tests/_fake_shards.py: not decodable)."""
    from tests._fake_shards import fake_shards

    return fake_shards(tmp_path / "demo" / "shards", [[40, 40], [40, 40]])


@pytest.fixture(scope="session")
def benchmark_script():
    """``load(name)``: ``benchmarks/{name}.py`` imported as a module (the benchmarks are scripts,
    not a package; ``benchmarks/`` goes on ``sys.path`` so their imports of each other resolve)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """After each test, forget a W&B service address (``WANDB_SERVICE``) that W&B, run inside the test
    process, left in its environment: a later test's subprocess would otherwise inherit it and log
    through this process's service instead of its own, and its .wandb file could be written after the
    subprocess has exited (a test reading it would see it incomplete)."""
    before = os.environ.get("WANDB_SERVICE")
    yield
    if before is None:
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def readme_block_run(tmp_path_factory):
    """README's self-contained bash block (it makes its own data: synth -> shards -> the eval
    protocols -> fine-tune -> train), every command in order as written from a fresh folder, once
    per session: ``(folder, [(argv, CompletedProcess), ...])``, stopping after the first command that
    fails. `mohico train` runs with --dry-run; the fine-tune (it trains: DeepSpeed, its own ranks)
    runs as a process of its own with W&B offline (its run is read by test_finetune), the other
    commands in this process (:func:`run_cli_in_process`) with W&B off. Shared by test_readme (each
    command exits 0) and test_finetune (the README's fine-tune learns, logs validation top-1 and
    resumes)."""
    import subprocess

    from _cli import run_cli_in_process
    from test_readme import self_contained_block, shell_commands

    folder = tmp_path_factory.mktemp("readme_block")
    results = []
    for argv in shell_commands(self_contained_block()):
        run = [*argv, "--dry-run"] if argv[1:2] == ["train"] else argv
        if argv[1:3] == ["eval", "finetune"]:
            res = subprocess.run([sys.executable, "-m", "mohico", *run[1:]], cwd=folder, capture_output=True,
                                 text=True, timeout=1200, env={**os.environ, "WANDB_MODE": "offline"})
        else:
            res = run_cli_in_process(run[1:], folder, {"WANDB_MODE": "disabled"})
        results.append((argv, res))
        if res.returncode != 0:
            break
    return folder, results
