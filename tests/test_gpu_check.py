"""`make gpu-check` (benchmarks/gpu_check.py): without a GPU it says so and exits 0; each GPU step runs
here on its CPU equivalent (DALI CPU vs PyAV, the Triton interpreter vs chunked PyTorch, gloo fp32 kill
+ resume), and a wrong result makes its row fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


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


def test_correlation_step_interpreted_triton_vs_streaming():
    r = gpu_check.check_correlation("cpu", N=2, C=8, S=8, radius=2, repeats=1)
    assert r["ok"], r["note"]


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
def test_pretrain_step_gloo_kill_and_resume_bitwise(synth_shards, tmp_path):
    r = gpu_check.check_pretrain(tmp_path, "cpu", steps=4, kill_at=3, shards=synth_shards, timeout=900)
    assert r["ok"], r["note"]
