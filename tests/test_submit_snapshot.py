"""Commands run as written: `mohico submit` takes overrides after its flags, snapshots the resolved
config (+ code version) into run.dir and the job trains from it; --cpus-per-task comes from the
partition or fails fast; option typos name the closest option; mapping overrides replace; the
wheel carries the configs and the sbatch template."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mohico.config import load_config, to_dict
from mohico.errors import ConfigError
from mohico.launcher.cli import main
from tests._fake_shards import fake_shards, paper_shards

ROOT = Path(__file__).resolve().parents[1]


def _submit(*args, capsys):
    code = main(["submit", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tool(folder: Path, name: str, body: str) -> None:
    f = folder / name
    f.write_text("#!/bin/bash\n" + body + "\n")
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch (keeps the script, prints job 4242), sinfo (partition 'gpu' with 32-CPU nodes, default
    'small*' with 6), srun (records its arguments), scontrol on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "sbatch", f'cat > {tmp_path}/submitted.sh; echo 4242')
    _tool(bin_dir, "sinfo", 'for a in "$@"; do case $a in --partition=gpu) echo "gpu 32"; echo "gpu 48"; exit 0;; '
                            '--partition=*) exit 0;; esac; done; echo "gpu 32"; echo "small* 6"')
    _tool(bin_dir, "srun", f'echo "$@" > {tmp_path}/srun-args')
    _tool(bin_dir, "scontrol", "exit 0")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_overrides_after_flags_as_in_the_readme(fake_slurm, capsys):
    shards = paper_shards(fake_slurm / "data" / "shards")          # /data/shards, as the dry run reads it
    code, out, err = _submit(str(ROOT / "configs" / "mcl_r2plus1d_k400.yaml"), "--nodes", "4", "--gpus-per-node", "8",
                             "--time", "48:00:00", "--partition", "gpu", "run.dir=/scratch/runs/mcl",
                             f"data.shards={shards}", "--dry-run", capsys=capsys)
    assert code == 0, err
    assert any(line.startswith("#SBATCH --output=") and "/scratch/runs/mcl/slurm-%j.out" in line
               for line in out.splitlines())
    assert "set -- /scratch/runs/mcl/submitted/" in out and "/config.yaml\n" in out
    assert not Path("/scratch/runs/mcl").exists() or not any(Path("/scratch/runs/mcl").glob("submitted/*"))


@pytest.mark.parametrize("argv, hint", [
    (["submit", "C", "--nodez", "2"], "did you mean '--nodes'?"),
    (["submit", "C", "--gpu-per-node=2"], "did you mean '--gpus-per-node'?"),
    (["train", "C", "--nprocs", "2"], "did you mean '--nproc'?"),
    (["train", "--nprocs", "2", "C"], "did you mean '--nproc'?"),
    (["eval", "R", "--trian", "S"], "did you mean '--train'?"),
])
def test_option_typos_name_the_closest_option(argv, hint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("C").write_text(f"defaults: [{ROOT / 'configs' / 'tiny_cpu.yaml'}]\n")
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and hint in err, err


def test_submit_snapshots_the_config_and_the_job_trains_from_it(fake_slurm, capsys):
    cfg_file = fake_slurm / "exp.yaml"
    cfg_file.write_text(f"defaults: [{ROOT / 'configs' / 'tiny_cpu.yaml'}]\noptim: {{lr: 0.07}}\n")
    code, out, err = _submit(str(cfg_file), "--gpus-per-node", "0", "--tasks-per-node", "2", "--partition", "gpu",
                             "run.dir=runs/x", "trainer.max_steps=9", "model.backbone_options={}", capsys=capsys)
    assert code == 0, err
    assert out.strip() == "4242"
    snaps = list((fake_slurm / "runs" / "x" / "submitted").glob("*/config.yaml"))
    assert len(snaps) == 1
    snap = snaps[0]
    record = json.loads((snap.parent / "submit.json").read_text())
    assert record["overrides"] == ["run.dir=runs/x", "trainer.max_steps=9", "model.backbone_options={}"]
    assert record["code"]["mohico"] and "git" in record["code"]
    if (ROOT / ".git").exists():
        assert record["code"]["git"] and len(record["code"]["git"].split("-")[0]) == 40
    submitted = load_config(cfg_file, record["overrides"])
    # the YAML changes after the submit: the job (and a requeued job) still trains what was submitted
    cfg_file.write_text(f"defaults: [{ROOT / 'configs' / 'tiny_cpu.yaml'}]\noptim: {{lr: 0.5}}\n")
    assert to_dict(load_config(snap)) == to_dict(submitted)
    assert load_config(snap).optim.lr == 0.07 and load_config(snap).model.backbone_options == {}
    # the script sbatch got runs `mohico train SNAPSHOT` on every task
    script = (fake_slurm / "submitted.sh").read_text()
    assert "#SBATCH --cpus-per-task=16" in script                    # 32-CPU nodes of 'gpu' / 2 tasks
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1"}
    res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (fake_slurm / "srun-args").read_text().split()[-3:] == ["mohico", "train", str(snap.resolve())]
    assert (fake_slurm / "runs" / "x" / "slurm-4242.sbatch").read_text() == script


def test_cpus_per_task_from_the_partition_or_fail_fast(fake_slurm, capsys, demo_shards):
    tiny = str(ROOT / "configs" / "tiny_cpu.yaml")
    code, out, err = _submit(tiny, "--gpus-per-node", "4", "--dry-run", capsys=capsys)      # default partition: 6 CPUs
    assert code == 0 and "#SBATCH --cpus-per-task=1" in out, err
    code, out, err = _submit(tiny, "--gpus-per-node", "8", "--partition", "gpu", "--cpus-per-task", "8", "--dry-run",
                             capsys=capsys)
    assert code == 2 and "8 x 8 tasks per node = 64 CPUs" in err and "at most 48" in err and "--cpus-per-task 6" in err
    code, out, err = _submit(tiny, "--gpus-per-node", "8", "--dry-run", capsys=capsys)
    assert code == 2 and "fewer than the 8 tasks per node" in err
    code, out, err = _submit(tiny, "--gpus-per-node", "8", "--partition", "nope", "--dry-run", capsys=capsys)
    assert code == 2 and "no nodes in partition 'nope'" in err


def test_cpus_per_task_without_sinfo_is_left_to_slurm(tmp_path, capsys, monkeypatch, demo_shards):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    code, out, err = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), "--dry-run", capsys=capsys)
    assert code == 0 and "--cpus-per-task=" not in out and "sizes --cpus-per-task from sinfo" in err
    code, out, _ = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), "--cpus-per-task", "3", "--dry-run", capsys=capsys)
    assert code == 0 and "#SBATCH --cpus-per-task=3" in out


def test_sinfo_without_a_controller_only_warns(tmp_path, capsys, monkeypatch, demo_shards):
    monkeypatch.chdir(tmp_path)
    _tool(tmp_path, "sinfo", 'echo "slurm_load_partitions: Unable to contact slurm controller" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code, out, err = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), "--dry-run", capsys=capsys)
    assert code == 0 and "--cpus-per-task=" not in out
    assert "Unable to contact slurm controller" in err and "not checked against the partition" in err


def test_mapping_overrides_replace_or_are_refused():
    tiny = ROOT / "configs" / "tiny_cpu.yaml"
    assert load_config(tiny).model.backbone_options == {"width": 8}
    assert load_config(tiny, ["model.backbone_options={}"]).model.backbone_options == {}
    assert load_config(tiny, ["model.backbone_options={width: 4}"]).model.backbone_options == {"width": 4}
    assert load_config(tiny, ["model.backbone_options.width=16"]).model.backbone_options == {"width": 16}
    with pytest.raises(ConfigError, match=r"model\.backbone_options\.widht.*did you mean 'width'"):
        load_config(tiny, ["model.backbone_options.widht=4"])


@pytest.mark.slow
def test_the_wheel_carries_configs_and_the_sbatch_template(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import shutil
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    wheel = next((tmp_path / "dist").glob("mohico-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mohico/slurm/pretrain.sbatch" in names
    assert {f"mohico/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    fake_shards(work / "demo" / "shards", [[40, 40], [40, 40]])      # tiny_cpu's data.shards, from there
    _tool(tmp_path, "sinfo", 'echo "slurm_load_partitions: Unable to contact slurm controller" >&2; exit 1')
    # sinfo as without a controller: the live local cluster of test_slurm (2-CPU nodes) may be up
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "-m", "mohico", "submit", "configs/tiny_cpu.yaml", "--dry-run",
                          "run.dir=runs/w"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "srun --kill-on-bad-exit=0" in res.stdout and f"set -- {work}/runs/w/submitted/" in res.stdout
