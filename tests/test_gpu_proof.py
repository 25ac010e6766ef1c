"""`make gpu-proof` (benchmarks/gpu_proof.py) without a GPU: every stage at toy size on the CPU, each
stage's JSON written, one table row per stage; the GPU run's config validates here; the ZeRO buckets the
engine sets (the smoke run's trainer starts DeepSpeed ZeRO-1 with them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_proof  # noqa: E402


@pytest.mark.slow
def test_smoke_run_writes_every_stage_and_one_table(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "no CUDA GPU" in res.stdout and "toy size on the CPU" in res.stdout
    got = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text()) for s in gpu_proof.STAGES}
    assert {s: r["status"] for s, r in got.items()} == {"step": "ok", "memory": "ok", "decode": "ok",
                                                         "kernels": "ok", "ablation": "not run"}
    assert all(r["mode"] == "smoke" for r in got.values())
    step = got["step"]
    assert step["trainer"]["step_s"] > 0 and step["bare"]["step_s"] > 0 and step["flops_per_step"] > 1e8
    assert step["overhead"] == step["trainer"]["step_s"] / step["bare"]["step_s"]
    assert 0 <= step["trainer"]["data_wait_frac"] < 1 and step["mfu"] == {"trainer": None, "bare": None}
    mem = got["memory"]
    assert mem["parts_mb"]["params_mb"] > 0 and mem["parts_mb"]["banks_mb"] > 0
    assert mem["zero_bucket_elements"] % 4096 == 0 and mem["zero_bucket_elements"] >= mem["params"]
    assert all(v > 0 for v in got["decode"]["clips_per_s"]["vp9-test"].values())
    assert len(got["kernels"]["rows"]) == 2 and all(r["ok"] for r in got["kernels"]["rows"])
    assert "not run:" in got["ablation"]["summary"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert table in res.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(gpu_proof.STAGES)


def test_a_failing_stage_is_an_error_row_written_at_once(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_proof.FUNCS, "kernels", lambda ctx: 1 / 0)
    ctx = {"mode": "smoke", "out": tmp_path, "results": {}}
    r = gpu_proof.run_stage("kernels", ctx)
    assert r["status"] == "error" and "ZeroDivisionError" in r["summary"]
    assert json.loads((tmp_path / "kernels.json").read_text())["status"] == "error"
    r = gpu_proof.run_stage("memory", ctx)                 # needs the step stage: says so
    assert r["status"] == "error" and "step stage" in r["summary"]


def test_the_gpu_runs_config_is_the_production_step(tmp_path):
    cfg = gpu_proof.step_config("gpu", tmp_path / "shards", tmp_path / "run", 10)
    assert cfg.model.backbone == "r2plus1d_18" and (cfg.data.clip_len, cfg.data.crop_size) == (16, 112)
    assert cfg.trainer.precision == "bf16" and cfg.bank.size == 131072
    assert cfg.objectives.mcl.weight > 0 and cfg.objectives.hico.weight > 0 and cfg.objectives.hico.use_bank
    assert (cfg.data.device, cfg.data.decoder) == ("gpu", "dali")
    assert (cfg.trainer.max_steps, cfg.trainer.log_every) == (30, 10)


def test_zero_buckets_follow_the_model_size():
    from mohico.config import load_config
    from mohico.trainer.engine import DEEPSPEED_BUCKET, bucket_size, ds_config

    assert bucket_size(1_186_033) == 1_187_840 and bucket_size(1_187_840) == 1_187_840
    assert bucket_size(10 ** 10) == DEEPSPEED_BUCKET == bucket_size(None)
    z = ds_config(load_config(ROOT / "configs" / "tiny_cpu.yaml"), 1, params=1_186_033)["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 1_187_840


@pytest.mark.slow
def test_a_stage_past_the_budget_is_written_as_not_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--out", str(tmp_path), "--budget", "0",
                          "--only", "kernels,ablation", "--shards", str(tmp_path / "unused")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("kernels", "ablation"):
        r = json.loads((tmp_path / f"{stage}.json").read_text())
        assert r["status"] == "not run" and "time budget" in r["summary"]
    assert not (tmp_path / "step.json").exists()
