"""Hostile or awkward inputs that must not run anything or leak anything (issue 14, item 7): the
sbatch renderer quotes its paths and refuses run.dirs that would inject shell lines; secrets
given as ``${oc.env:...}`` are never written to the saved config, the checkpoint meta or W&B.
(Poisoned checkpoint files: tests/test_failure_checkpoint.py.)"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mohico.config import load_config, save_config, to_dict, to_saved_dict
from mohico.errors import UsageError
from mohico.launcher.submit import SubmitOptions, render_sbatch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


def render(tmp_path, run_dir):
    cfg = load_config(CONFIG, [f"run.dir={run_dir}"]) if "\n" not in run_dir else load_config(CONFIG)
    if "\n" in run_dir:      # a YAML file can hold a newline in a string
        cfg.run.dir = run_dir
    return render_sbatch(cfg, CONFIG, [], SubmitOptions(gpus_per_node=0, tasks_per_node=2), workdir=tmp_path)


@pytest.mark.parametrize("run_dir", ["runs/x\ntouch /tmp/pwned", "runs/50%", "runs/a#b", "runs/it's", 'runs/"q"'])
def test_sbatch_refuses_run_dirs_that_break_the_job_script(tmp_path, run_dir):
    with pytest.raises(UsageError, match="cannot go into a #SBATCH line"):
        render(tmp_path, run_dir)


def test_sbatch_quotes_paths_with_spaces(tmp_path):
    script = render(tmp_path, "runs/my run")
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert f'#SBATCH --output="{tmp_path}/runs/my run/slurm-%j.out"' in lines
    assert f'#SBATCH --chdir="{tmp_path}"' in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_env_secrets_are_not_saved(tmp_path, monkeypatch):
    secret = "s3cr3t-token-123"
    monkeypatch.setenv("MOHICO_TEST_TOKEN", secret)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"defaults: [{CONFIG}]\nwandb:\n  entity: ${{oc.env:MOHICO_TEST_TOKEN}}\n"
                    "data:\n  shards: \"pipe:curl -s -H 'Authorization: ${oc.env:MOHICO_TEST_TOKEN}' https://x/s.tar\"\n")
    cfg = load_config(yaml)
    assert cfg.wandb.entity == secret and secret in cfg.data.shards          # resolved for the run itself
    saved = to_saved_dict(cfg)                                                # checkpoint meta and W&B config
    assert secret not in repr(saved) and saved["wandb"]["entity"] == "${oc.env:MOHICO_TEST_TOKEN}"
    assert to_dict(cfg)["wandb"]["entity"] == secret
    save_config(cfg, tmp_path / "run" / "config.yaml")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert secret not in text and "oc.env:MOHICO_TEST_TOKEN" in text
    again = load_config(tmp_path / "run" / "config.yaml")                    # re-resolves from the environment
    assert again.wandb.entity == secret and again.data.shards == cfg.data.shards


def _pipe_list(tmp_path, synth_shards):
    """A shard list whose first line is a command: webdataset's gopen would run it in a shell."""
    marker = tmp_path / "MARKER"
    first = sorted(Path(synth_shards).glob("*.tar"))[0]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"pipe:touch {marker}; cat {first}\n")
    return listing, marker, first


def test_shard_list_with_a_command_is_refused(tmp_path, synth_shards):
    from mohico.datasets.load.pipeline import build_loader
    from mohico.datasets.shard_list import expand_shards
    from mohico.errors import ConfigError

    listing, marker, _ = _pipe_list(tmp_path, synth_shards)
    cfg = load_config(CONFIG, [f"data.shards={listing}", "data.num_workers=0"])
    try:
        with pytest.raises(ConfigError) as e:           # data.allow_commands is false by default
            build_loader(cfg)
    finally:
        assert not marker.exists(), "the shard list's command ran"
    msg = str(e.value)
    assert "data.allow_commands=true" in msg and "pipe:touch" in msg and str(listing) in msg
    for url in ("pipe:echo hi", "PIPE:echo hi"):
        with pytest.raises(ConfigError, match="data.allow_commands"):
            expand_shards([url])
    assert not marker.exists()                                                # nothing ran


def test_shard_list_with_a_command_runs_when_allowed(tmp_path, synth_shards):
    from mohico.datasets.load.pipeline import build_loader
    from mohico.datasets.shard_list import expand_shards
    from mohico.datasets.load.pipeline_stream import iter_shard

    listing, marker, first = _pipe_list(tmp_path, synth_shards)
    assert load_config(CONFIG).data.allow_commands is False
    cfg = load_config(CONFIG, [f"data.shards={listing}", "data.num_workers=0", "data.allow_commands=true"])
    urls = expand_shards(cfg.data.shards, allow_commands=True)
    assert urls == [f"pipe:touch {marker}; cat {first}"]
    build_loader(cfg)                                # reads the first shard's geometry through the command
    assert marker.exists()
    assert [s["__key__"] for s in iter_shard(urls[0])] == [s["__key__"] for s in iter_shard(str(first))]
