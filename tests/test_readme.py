"""README's commands run as written: every command of its ```bash and ```python blocks is
extracted and run (`mohico train`/`submit` with --dry-run appended, `make` with -n, `python -c`
with this interpreter; the paths
that stand for large data point at small fabricated data: /data/shards -> the synthetic shards
(for `mohico train`/`submit`, whose dry runs check the shards against the paper config's 224 px
crops and 4 nodes x 8 GPUs: tests/_fake_shards.py's paper-scale stand-ins), runs/mcl -> a
fabricated run of the README's config)."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._fake_shards import paper_shards

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands(block: int | None = None) -> list[list[str]]:
    """Each command of the bash blocks (or of block number ``block``) as argv (line continuations
    joined, comments dropped)."""
    out = []
    for i, text in enumerate(blocks("bash")):
        for line in text.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and block in (None, i):
                out.append(argv)
    return out


def self_contained_block() -> int:
    """The bash block that makes its own data (starts with `mohico synth`): run end to end (slow test)."""
    (i,) = [i for i, text in enumerate(blocks("bash")) if shell_commands(i) and shell_commands(i)[0][:2] == ["mohico", "synth"]]
    return i


def parses(argv: list[str]) -> None:
    """``mohico ...`` parses as `mohico` parses it (SystemExit 2 on a usage error)."""
    from mohico.launcher import cli

    parser = cli.build_parser()
    cli._check_long_options(parser, argv[1:])
    args, extras = parser.parse_known_args(argv[1:])
    cli._take_extras(args, extras)


def test_readme_has_the_commands_this_test_runs():
    names = [a[:2] for a in shell_commands()]
    assert ["make", "demo"] in names and ["make", "test"] in names
    for cmd in ("shards", "inspect", "train", "submit", "export"):
        assert ["mohico", cmd] in names, cmd
    assert len(blocks("python")) >= 2


def fabricate_run(run_dir: Path, config: str, shards: Path) -> None:
    """A run directory as the trainer leaves it (DeepSpeed module file, meta with the config)."""
    from mohico.config import load_config, to_dict
    from mohico.models.backbones import build_backbone

    cfg = load_config(ROOT / config, [f"run.dir={run_dir}", f"data.shards={shards}"])
    net = build_backbone(cfg.model.backbone, **cfg.model.backbone_options)
    from mohico.trainer.checkpoint.layout import FORMAT

    tag = run_dir / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.save({"module": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, tag / "mp_rank_00_model_states.pt")
    (tag / "mohico_meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "config": to_dict(cfg),
                                                      "format": FORMAT}))
    (tag.parent / "latest").write_text(tag.name)


@pytest.fixture
def workdir(tmp_path, monkeypatch, synth_shards):
    """A fresh directory (the README's paths are relative to where a user stands) with runs/mcl
    fabricated, and an sinfo that reports a 'gpu' partition of 128-CPU nodes."""
    monkeypatch.chdir(tmp_path)
    fabricate_run(tmp_path / "runs" / "mcl", "configs/mcl_r2plus1d_k400.yaml", paper_shards(tmp_path / "paper-shards"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text('#!/bin/bash\ncase "$*" in *--partition=gpu*) echo "gpu 128";; '
                                   '*--partition=*) ;; *) echo "gpu 128"; echo "cpu* 16";; esac\n')
    (bin_dir / "sinfo").chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def run_mohico(argv: list[str], synth_shards: Path, capsys) -> tuple[int, str, str]:
    from mohico.launcher.cli import main

    shards = Path("paper-shards").absolute() if argv[1] in ("train", "submit") else synth_shards   # (workdir's)
    argv = [a.replace("/data/shards", str(shards), 1) if "/data/shards" in a else a for a in argv]
    if argv[1] in ("train", "submit"):
        argv.append("--dry-run")
    code = main(argv[1:])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_every_readme_command_parses():
    for argv in shell_commands():
        if argv[0] == "mohico":
            parses(argv)


@pytest.mark.slow
def test_readme_shell_commands_run_as_written(workdir, synth_shards, capsys):
    ran = []
    own = self_contained_block()
    for argv in shell_commands():
        if argv in shell_commands(own):
            continue            # makes its own data: test_readme_evaluate_block_runs_as_written (slow)
        if argv[0] == "make":
            res = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, (argv, res.stderr)
        elif argv[:2] == ["python", "-c"]:     # makes a file a later command reads (e.g. model.init's weights)
            res = subprocess.run([sys.executable, *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, (argv, res.stderr[-3000:])
        elif argv[:2] == ["mohico", "shards"]:
            continue            # needs videos: test_readme_shards_command_runs_as_written (slow)
        else:
            assert argv[0] == "mohico", argv
            code, out, err = run_mohico(argv, synth_shards, capsys)
            assert code == 0, (argv, err)
            if argv[1] == "submit":
                assert "#SBATCH --cpus-per-task=16" in out and "#SBATCH --partition=gpu" in out
            if argv[1] == "train":
                assert "mohico train: dry run" in err
        ran.append(argv[1] if argv[0] == "mohico" else argv[0])
    assert (workdir / "sample.png").stat().st_size > 0
    import torchvision

    torchvision.models.video.r2plus1d_18().load_state_dict(torch.load(workdir / "backbone.pt", weights_only=True))
    assert {"make", "python", "inspect", "train", "submit", "export"} <= set(ran)
    assert (workdir / "resnet18.pt").stat().st_size > 0          # model.init's file, read by the dry run


@pytest.mark.slow     # an R(2+1)D-18 forward at the config's 16 x 224 x 224 clip: ~30-50 s on 2 cores
def test_readme_python_snippets_run_as_written(workdir, synth_videos):
    use, hub = blocks("python")[:2]
    import shutil

    shutil.copy(sorted(synth_videos.glob("*.webm"))[0], workdir / "video.webm")   # the video it decodes
    scope: dict = {}                        # runs as written: nothing defined for it
    exec(compile(use, "README.md (Use the encoder)", "exec"), scope)
    assert scope["frames"].dtype == np.uint8 and scope["frames"].shape[-1] == 3
    assert scope["embedding"].shape == (1, 512) and torch.isfinite(scope["embedding"]).all()
    assert not scope["embedding"].requires_grad     # under torch.no_grad(), as the snippet says
    assert "path/to/mohico" in hub
    scope2: dict = {}
    exec(compile(hub.replace("path/to/mohico", str(ROOT)), "README.md (torch.hub)", "exec"), scope2)
    assert scope2["encoder"].preprocessing == scope["prep"]


@pytest.mark.slow
def test_readme_shards_command_runs_as_written(tmp_path, monkeypatch):
    """`mohico shards` exactly as written, on two small synthetic videos at /data/videos's place."""
    from mohico.datasets.synthetic.synth import synthesize

    (cmd,) = [a for a in shell_commands() if a[:2] == ["mohico", "shards"] and "/data/videos" in a]
    monkeypatch.chdir(tmp_path)
    synthesize(tmp_path / "videos", videos=2, seed=1, codec="vp9", fps=15, size=(96, 64), duration=2.0, topics=2)
    labels = json.loads((tmp_path / "videos" / "labels.json").read_text())
    (tmp_path / "labels.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in labels.items()))
    argv = [str(tmp_path / "videos") if a == "/data/videos" else str(tmp_path / "shards") if a == "/data/shards" else a
            for a in cmd]
    res = subprocess.run([sys.executable, "-m", "mohico", *argv[1:]], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert man["complete"] and man["num_samples"] == 2 and man["options"]["fps"] == int(cmd[cmd.index("--fps") + 1])


@pytest.mark.slow
def test_readme_self_contained_block_runs_as_written(readme_block_run):
    """The block that fabricates its own benchmark trees (synth -> shards -> eval protocols -> train),
    every command in order as written (train with --dry-run), from a fresh directory
    (``readme_block_run``, shared with test_finetune's check of the fine-tune it runs)."""
    _, results = readme_block_run
    for argv, res in results:
        assert argv[0] == "mohico", argv
        assert res.returncode == 0, (argv, res.stderr[-3000:])
    assert [argv for argv, _ in results] == shell_commands(self_contained_block())
