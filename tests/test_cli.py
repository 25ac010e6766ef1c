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


# What a training rank imports (`python -m mohico.launcher.spawn train CONFIG ...` -> cli.main ->
# commands/train.run -> trainer.train) up to its first step with online kNN off, the rank-0
# RunLog included: none of the eval stack, the other commands, torchvision (imported when an
# R3D / R(2+1)D / S3D backbone is built) or packages loaded only on use (cv2, wandb, DALI, PyAV).
_RANK_IMPORTS = """
import json, sys, tempfile
from pathlib import Path
from mohico.launcher import cli
cli.build_parser(cli._named_command(["train", "configs/tiny_cpu.yaml", "trainer.max_steps=1"]))
import mohico.launcher.spawn, mohico.launcher.commands.train, mohico.dist, mohico.trainer.train
from mohico.config import load_config
from mohico.trainer.run_log import RunLog
run_dir = Path(tempfile.mkdtemp())
(run_dir / "logs").mkdir()
cfg = load_config("configs/tiny_cpu.yaml", [f"run.dir={run_dir}", "eval.every_steps=0"])
RunLog(cfg, run_dir, 0, 1, "cpu", object(), None, 0).close()
print(json.dumps(sorted(sys.modules)))
"""
_NOT_IMPORTED_BY_A_RANK = ("torchvision", "cv2", "wandb", "nvidia.dali", "av", "mohico.trainer.online_knn",
                           "mohico.eval",      # the whole floor: features, protocols, report, knn, linear_probe, finetune
                           "mohico.eval.features", "mohico.eval.protocols", "mohico.eval.report",
                           "mohico.eval.knn", "mohico.eval.linear_probe", "mohico.eval.finetune",
                           "mohico.datasets.load.eval_clips",
                           "mohico.models.torchvision_import", "mohico.models.export",
                           *(f"mohico.launcher.commands.{c}" for c in SUBCOMMANDS if c != "train"))


def test_training_rank_imports_no_eval_stack_nor_torchvision():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _RANK_IMPORTS], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "mohico.trainer.train" in loaded and "mohico.trainer.run_log" in loaded
    pulled = sorted(m for m in loaded if any(m == x or m.startswith(x + ".") for x in _NOT_IMPORTED_BY_A_RANK))
    assert not pulled, f"a training rank with online kNN off imports {pulled}"


def _parsed(argv: list[str]):
    """``argv`` parsed as main() does (the command's parser, then key=value extras joined)."""
    from mohico.launcher.cli import _take_extras, build_parser

    args, extras = build_parser(argv[0]).parse_known_args(argv)
    _take_extras(args, extras)
    return args


def test_eval_and_inspect_take_positional_overrides_like_train(tmp_path):
    """Issue 28 item 3: one override syntax: positional key=value for eval and inspect too; --set still works."""
    from mohico.launcher.commands.eval import parse_target, take_positional_overrides

    odd = tmp_path / "run.lr=0.1"          # an existing path with '=' stays the checkpoint
    odd.mkdir()
    for argv, want in [
        (["eval", "linear", "runs/a", "data.clip_len=8", "--train", "t", "--val", "v", "--set", "data.crop_size=64"],
         ("linear", "runs/a", ["data.crop_size=64", "data.clip_len=8"])),
        (["eval", "runs/a", "--train", "t", "--val", "v", "data.clip_len=8"], ("knn", "runs/a", ["data.clip_len=8"])),
        (["eval", str(odd), "--train", "t", "--val", "v"], ("knn", str(odd), [])),
    ]:
        args = _parsed(argv)
        take_positional_overrides(args)
        assert (*parse_target(args.target), args.overrides) == want, argv
    for argv in (["inspect", "s.tar", "data.clip_len=8", "--out", "x.png", "--config", "c.yaml"],
                 ["inspect", "s.tar", "--out", "x.png", "--config", "c.yaml", "--set", "data.clip_len=8"]):
        assert _parsed(argv).overrides == ["data.clip_len=8"], argv
