"""The `mohico` command: help, subcommands, exit codes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mohico.launcher.cli import SUBCOMMANDS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mohico", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("synth", "shards", "train", "submit", "eval", "export", "inspect"):
        assert name in out.stdout


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("mohico")
    assert exe, "the `mohico` console script is not on PATH (pip install -e . creates it)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "COMMAND" in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"mohico {name}" in capsys.readouterr().out


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2


def test_unknown_command_is_usage_error():
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_eval_is_built_and_needs_its_shards():
    out = run_cli("eval", "--help")
    assert out.returncode == 0 and "--train" in out.stdout and "kNN" in out.stdout
    out = run_cli("eval", "random")
    assert out.returncode == 2 and "--train" in out.stderr


def test_config_error_exits_2_with_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectives: {mcl: {weight: 1}}\noptim: {lrr: 1}\n")
    out = run_cli("train", str(bad), "--help")
    assert out.returncode == 0   # --help never loads the config
    out = run_cli("train", str(bad))
    assert out.returncode == 2, out.stderr
    assert "optim.lrr" in out.stderr and "bad.yaml" in out.stderr and "Traceback" not in out.stderr


def test_runtime_error_exits_1(tmp_path, monkeypatch):
    from mohico.errors import MohicoError
    from mohico.launcher.commands import synth

    def boom(args):
        raise MohicoError("disk on fire")

    monkeypatch.setattr(synth, "run", boom)
    assert main(["synth", str(tmp_path)]) == 1
