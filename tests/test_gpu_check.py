"""`make gpu-check` (benchmarks/gpu_check.py): without a GPU it says so and exits 0; each GPU step runs
here on its CPU equivalent (DALI CPU vs PyAV, the Triton interpreter vs chunked PyTorch, gloo fp32 pretraining
with one real run: the kill + exact resume is test_trainer.py's), and a wrong result makes its row fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_without_a_gpu_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA GPU" in res.stdout


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bank_step_interpreted_triton_vs_chunked(dtype):
    r = gpu_check.check_bank("cpu", K=700, bank_dtype=dtype, B=8, d=32, repeats=1, floor_us=1.0)
    assert r["ok"], r["note"]


def test_bank_step_fails_on_a_wrong_kernel(monkeypatch):
    import mohico.kernels as K

    real = K.bank_nce

    def off_by_a_bit(q, kp, bank, tau, impl=None, **kw):
        assert kw["q_ids"] is not None and kw["bank_ids"] is not None       # the masked path is checked
        out = real(q, kp, bank, tau, impl=impl, **kw)
        return out * 1.001 if impl == "triton" else out
    monkeypatch.setattr(K, "bank_nce", off_by_a_bit)
    r = gpu_check.check_bank("cpu", K=300, bank_dtype="fp32", B=4, d=16, repeats=1, floor_us=1.0)
    assert not r["ok"] and "rel |dloss|" in r["note"]


@pytest.mark.slow
def test_correlation_step_interpreted_triton_vs_streaming():
    r = gpu_check.check_correlation("cpu", N=2, C=8, S=8, radius=2, repeats=1)
    assert r["ok"], r["note"]


@pytest.mark.slow
def test_decode_step_dali_cpu_vs_pyav(synth_shards, tmp_path):
    r = gpu_check.check_decode(tmp_path, "vp9", "cpu", "pyav", batches=1, shards=synth_shards, workers=0, crop_size=96)
    assert r["ok"], r["note"]
    assert "same draws: True" in r["note"]


def test_a_failing_step_is_a_failed_row_and_the_others_still_run(capsys):
    rows = gpu_check.run_checks([("bank", lambda: 1 / 0), ("x", lambda: gpu_check.row("x", "1", "1", True))])
    assert [r["ok"] for r in rows] == [False, True] and "ZeroDivisionError" in rows[0]["note"]
    gpu_check.print_table(rows, "t")
    out = capsys.readouterr().out
    assert "| bank | error |" in out and "FAIL" in out


def test_checkpoint_differences(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    torch.save({"w": torch.ones(3), "loader": {"counters": {"bytes_read": 5}}, "step": 2}, a / "x.pt")
    torch.save({"w": torch.ones(3), "loader": {"counters": {"bytes_read": 9}}, "step": 2}, b / "x.pt")
    assert gpu_check.checkpoint_differences(a, b) == []           # statistics counters are not state
    torch.save({"w": torch.tensor([1.0, 1.0, 1.0 + 2 ** -20]), "loader": {"counters": {}}, "step": 2}, b / "x.pt")
    assert gpu_check.checkpoint_differences(a, b) == ["x.pt.w"]


@pytest.mark.slow
@pytest.mark.dist
def test_pretrain_step_cpu_path_with_one_real_run(synth_shards, tmp_path, monkeypatch):
    """check_pretrain's CPU path (gloo + fp32, ZeRO-1, its command line and overrides, the row) with
    one real run: the uninterrupted one (2 steps). The killed and resumed runs are stood in for: the
    killed one exits -9, the resumed one ends with the whole run's checkpoints (the row is ok), then
    with one weight changed (the row fails, naming it).

    The kill + bitwise-exact resume itself is tests/test_trainer.py::
    test_exact_resume_after_sigkill_and_interrupted_save (tiny_cpu, ZeRO-1, gloo + fp32, deterministic;
    a rank SIGKILLed at step 3 and again during the step-4 save, resumed, bitwise equal to an
    uninterrupted run); on a GPU `make gpu-check` runs all three runs for real."""
    import shutil

    real, kept, calls, changed = gpu_check._train, tmp_path / "kept-whole", [], {}

    def train(run_dir, shards, overrides, env, timeout):
        calls.append((run_dir.name, overrides, env))
        if run_dir.name == "whole":
            if kept.is_dir():                       # the second check: the first one's real run again
                shutil.copytree(kept, run_dir, dirs_exist_ok=True)
                return 0
            code = real(run_dir, shards, overrides, env, timeout)
            shutil.copytree(run_dir, kept)
            return code
        if "MOHICO_FAULT" in env:
            return -9
        shutil.copytree(run_dir.parent / "whole" / "checkpoints", run_dir / "checkpoints", dirs_exist_ok=True)
        if "weight" in changed:                     # one weight of the "resumed" run changed
            f = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
            state = torch.load(f, map_location="cpu", weights_only=False)
            name = next(k for k, v in state["module"].items() if v.is_floating_point() and v.numel() > 1)
            state["module"][name] = state["module"][name].clone()
            state["module"][name].view(-1)[0] += 2 ** -10
            torch.save(state, f)
            changed["weight"] = name
        return 0

    monkeypatch.setattr(gpu_check, "_train", train)
    r = gpu_check.check_pretrain(tmp_path, "cpu", steps=2, kill_at=1, shards=synth_shards, timeout=900)
    assert r["ok"], r["note"]
    assert "exit codes whole/killed/resumed [0, -9, 0]" in r["note"] and "checkpoints bitwise equal" in r["note"]
    assert r["check"] == "pretrain tiny, ZeRO-1, gloo + fp32, kill at 1 + resume" and r["peak_mb"] is None
    assert [c[0] for c in calls] == ["whole", "killed", "killed"]
    assert calls[0][2] == calls[2][2] == {"CUDA_VISIBLE_DEVICES": ""}
    assert calls[1][2] == {"CUDA_VISIBLE_DEVICES": "", "MOHICO_FAULT": "step:1:0"}
    assert {"trainer.max_steps=2", "trainer.zero_stage=1", "trainer.precision=fp32", "data.device=cpu",
            "trainer.deterministic=true"} <= set(calls[0][1]) and calls[0][1] == calls[1][1] == calls[2][1]
    assert (kept / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert [json.loads(x)["step"] for x in (kept / "logs" / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    changed["weight"] = None
    r = gpu_check.check_pretrain(tmp_path, "cpu", steps=2, kill_at=1, shards=synth_shards, timeout=900)
    assert not r["ok"], r["note"]
    assert f"1 differ, e.g. ['mp_rank_00_model_states.pt.module.{changed['weight']}']" in r["note"], r["note"]
