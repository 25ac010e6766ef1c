"""Memory-bank NCE / partial LSE: chunked PyTorch and Triton (CPU interpreter) vs float64 numpy.

Data are fresh on every run (the seed is printed in assertion messages to reproduce a failure).
The Triton kernels are built by the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
import secrets

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mohico.kernels import bank_lse, bank_nce
from mohico.kernels import bank_nce_triton as bt  # built interpreted (TRITON_INTERPRET=1 from conftest.py)

TAU = 0.07


def _data(B, K, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    kp = F.normalize(q + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    return q.to(dtype), kp.to(dtype), bank.to(dtype)


def _np_nce(q, kp, bank, tau):
    """float64 numpy: loss (B,), dq (B, d), lse over the bank alone (B,) and its dq."""
    q, kp, bank = (np.asarray(t.detach().double().numpy(), np.float64) for t in (q, kp, bank))
    pos = (q * kp).sum(1) / tau
    neg = q @ bank.T / tau  # (B, K)
    allv = np.concatenate([pos[:, None], neg], axis=1)
    m = allv.max(1, keepdims=True)
    p = np.exp(allv - m)
    lse = np.log(p.sum(1)) + m[:, 0]
    p /= p.sum(1, keepdims=True)
    dq = (p[:, :1] * kp + p[:, 1:] @ bank - kp) / tau
    if bank.shape[0]:
        mb = neg.max(1, keepdims=True)
        pb = np.exp(neg - mb)
        lse_b = np.log(pb.sum(1)) + mb[:, 0]
        dq_b = (pb / pb.sum(1, keepdims=True)) @ bank / tau
    else:
        lse_b, dq_b = np.full(q.shape[0], -np.inf), np.zeros_like(q)
    return lse - pos, dq, lse_b, dq_b


def _run(fn, q, *args, **kw):
    q = q.detach().clone().requires_grad_()
    out = fn(q, *args, **kw)
    (dq,) = torch.autograd.grad(out.sum(), q)
    return out.detach(), dq


SHAPES = [(B, K, d) for B in (1, 7, 33) for K in (1, 1000, 4097) for d in (64, 128)]


@pytest.mark.slow
@pytest.mark.parametrize("B,K,d", SHAPES)
@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_bank_nce_and_lse_match_numpy_float64(B, K, d, impl):
    seed = secrets.randbits(31)
    q, kp, bank = _data(B, K, d, seed)
    loss_ref, dq_ref, lse_ref, dqb_ref = _np_nce(q, kp, bank, TAU)
    kw = {"tile": 999} if impl == "torch" else {}
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl, **kw)
    lse, dqb = _run(bank_lse, q, bank, TAU, impl=impl, **kw)
    assert loss.shape == (B,) and loss.dtype == torch.float64
    for got, ref in ((loss, loss_ref), (dq, dq_ref), (lse, lse_ref), (dqb, dqb_ref)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10, err_msg=f"seed={seed}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-3), (torch.float16, 2e-3)])
def test_low_precision_inputs_accumulate_in_float32(impl, dtype, tol):
    seed = secrets.randbits(31)
    q, kp, bank = _data(7, 1000, 64, seed, dtype)
    # The reference sees exactly the quantised inputs, in float64.
    loss_ref, dq_ref, lse_ref, _ = _np_nce(q, kp, bank, TAU)
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl)
    lse = bank_lse(q, bank, TAU, impl=impl)
    assert loss.dtype == torch.float32 and dq.dtype == dtype and lse.dtype == torch.float32
    np.testing.assert_allclose(loss.double().numpy(), loss_ref, rtol=tol, atol=tol, err_msg=f"seed={seed}")
    np.testing.assert_allclose(lse.double().numpy(), lse_ref, rtol=tol, atol=tol, err_msg=f"seed={seed}")
    # dq is rounded to the input dtype on return: compare at that dtype's resolution.
    np.testing.assert_allclose(dq.double().numpy(), dq_ref, rtol=0, atol=(tol * 10 if dtype != torch.float32 else tol) * np.abs(dq_ref).max(), err_msg=f"seed={seed}")


def test_triton_writes_every_output_element():
    """Poisoned (NaN) output buffers are fully overwritten, for several bank splits."""
    seed = secrets.randbits(31)
    B, K, d = 33, 1000, 64
    q, kp, bank = _data(B, K, d, seed)
    _, _, lse_ref, dqb_ref = _np_nce(q, kp, bank, TAU)
    for splits in (1, 3, 16):
        c = bt._config(q, K, splits)
        m = torch.full((c["splits"], B), float("nan"), dtype=torch.float64)
        s = torch.full_like(m, float("nan"))
        bt.lse_partials_triton(q, bank, 1 / TAU, None, splits, out=(m, s))
        assert torch.isfinite(m).all() and torch.isfinite(s).all(), f"splits={splits} seed={seed}"
        lse = bt.combine_partials(m, s)
        np.testing.assert_allclose(lse.numpy(), lse_ref, rtol=1e-12, err_msg=f"seed={seed}")
        dq_buf = torch.full((c["splits"], B, d), float("nan"), dtype=torch.float64)
        dq = bt.lse_backward_triton(q, bank, None, lse, torch.ones(B, dtype=torch.float64), 1 / TAU,
                                    splits, out=dq_buf)
        assert torch.isfinite(dq_buf).all()
        np.testing.assert_allclose(dq.numpy(), dqb_ref, rtol=1e-10, atol=1e-12, err_msg=f"seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradcheck(impl):
    seed = secrets.randbits(31)
    q, kp, bank = _data(3, 37, 16, seed)
    kw = {"tile": 8} if impl == "torch" else {"splits": 2}
    q = (q * 3).requires_grad_()  # not unit norm: exercises a non-degenerate softmax
    assert torch.autograd.gradcheck(lambda x: bank_nce(x, kp, bank, 0.5, impl=impl, **kw), (q,))
    assert torch.autograd.gradcheck(lambda x: bank_lse(x, bank, 0.5, impl=impl, **kw), (q,))
    # second-order terms are not provided; first order is what training needs.


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_empty_bank_shard(impl):
    q, kp, bank = _data(4, 0, 64, secrets.randbits(31))
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl)
    # -pos + lse([pos]): zero up to the rounding of two summation orders of q.k+.
    assert loss.abs().max() < 1e-12 and dq.abs().max() < 1e-12
    lse, dqb = _run(bank_lse, q, bank, TAU, impl=impl)
    assert torch.isneginf(lse).all() and torch.equal(dqb, torch.zeros_like(dqb))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_shard_partials_combine_to_the_whole_bank(impl):
    """What the distributed MemoryBank does: logsumexp over per-shard partials (one shard empty)."""
    seed = secrets.randbits(31)
    q, kp, bank = _data(7, 1000, 64, seed)
    _, _, lse_ref, dqb_ref = _np_nce(q, kp, bank, TAU)
    qq = q.clone().requires_grad_()
    shards = [bank[:333], bank[333:333], bank[333:]]
    lse = torch.logsumexp(torch.stack([bank_lse(qq, sh, TAU, impl=impl) for sh in shards]), dim=0)
    (dq,) = torch.autograd.grad(lse.sum(), qq)
    np.testing.assert_allclose(lse.detach().numpy(), lse_ref, rtol=1e-12, err_msg=f"seed={seed}")
    np.testing.assert_allclose(dq.numpy(), dqb_ref, rtol=1e-10, atol=1e-12, err_msg=f"seed={seed}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_gradient_to_bank_or_positive(impl):
    q, kp, bank = _data(5, 100, 64, secrets.randbits(31))
    q.requires_grad_(), kp.requires_grad_(), bank.requires_grad_()
    bank_nce(q, kp, bank, TAU, impl=impl).sum().backward()
    assert q.grad is not None and kp.grad is None and bank.grad is None


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # new allocations only: views / detach of the inputs (the bank itself) don't count
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_chunked_torch_never_materialises_b_by_k():
    """Largest tensor created in forward and backward is O(B * tile), not O(B * K)."""
    B, K, d, tile = 16, 20000, 32, 512
    q, kp, bank = _data(B, K, d, secrets.randbits(31), torch.float32)
    q.requires_grad_()
    with _MaxNumel() as mode:
        bank_nce(q, kp, bank, TAU, impl="torch", tile=tile).sum().backward()
    assert mode.max_numel <= max(B * tile, tile * d), mode.max_numel
    with _MaxNumel() as mode:
        bank_nce(q, kp, bank, TAU, impl="reference")
    assert mode.max_numel >= B * K  # the oracle does materialise them (the test can fail)


def test_bad_inputs_raise():
    q, kp, bank = _data(4, 10, 64, 0)
    with pytest.raises(ValueError, match="bank_keys must be"):
        bank_nce(q, kp, bank[:, :32], TAU)
    with pytest.raises(ValueError, match="k_pos must match"):
        bank_nce(q, kp[:2], bank, TAU)
    with pytest.raises(ValueError, match="impl must be one of"):
        bank_lse(q, bank, TAU, impl="cuda")



@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_second_derivatives_are_exact(impl):
    """create_graph=True takes a differentiable recomputation: gradgradcheck, and equal to the
    reference's double backward (not silently zero, as a detached backward would be)."""
    q, kp, bank = _data(3, 11, 8, secrets.randbits(31))
    q = (2 * q).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: bank_nce(x, kp, bank, 0.5, impl=impl, tile=4), (q,))
    assert torch.autograd.gradgradcheck(lambda x: bank_lse(x, bank, 0.5, impl=impl, tile=4), (q,))
    hv = []
    for im in ("reference", impl):
        (dq,) = torch.autograd.grad((bank_nce(q, kp, bank, 0.5, impl=im) ** 2).sum(), q, create_graph=True)
        hv.append(torch.autograd.grad(dq.square().sum(), q)[0])
    torch.testing.assert_close(hv[1], hv[0], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    """In a fresh process without TRITON_INTERPRET, impl='triton' on CPU names the fix."""
    import subprocess
    import sys

    code = ("import torch\nfrom mohico.kernels import bank_nce, KernelUnavailableError\n"
            "q = torch.randn(2, 8)\n"
            "try:\n    bank_nce(q, q, q, 0.1, impl='triton')\nexcept KernelUnavailableError as e:\n"
            "    print('OK', e)\n"
            "print(float(bank_nce(q, q, q, 0.1).sum()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK impl='triton' needs CUDA tensors" in res.stdout and "impl='torch'" in res.stdout


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_does_not_lower_the_precision(impl):
    seed = secrets.randbits(31)
    q, kp, bank = _data(8, 1000, 64, seed, torch.float32)
    loss_ref, dq_ref, _, _ = _np_nce(q, kp, bank, TAU)
    qq = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bank_nce(qq, kp, bank, TAU, impl=impl)
    (dq,) = torch.autograd.grad(loss.sum(), qq)  # backward outside autocast, as torch recommends
    loss = loss.detach()
    assert loss.dtype == torch.float32 and dq.dtype == torch.float32
    np.testing.assert_allclose(loss.double().numpy(), loss_ref, rtol=2e-6, atol=2e-6, err_msg=f"seed={seed}")
    np.testing.assert_allclose(dq.double().numpy(), dq_ref, rtol=1e-4, atol=1e-5, err_msg=f"seed={seed}")


@pytest.mark.parametrize("q_dtype,bank_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float64, torch.float16)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mixed_query_and_bank_dtypes(impl, q_dtype, bank_dtype):
    """e.g. float32 queries against a bf16 bank: the bank is converted tile by tile, not copied."""
    seed = secrets.randbits(31)
    q, kp, bank = _data(7, 300, 64, seed)
    q, bank = q.to(q_dtype), bank.to(bank_dtype)
    loss_ref, dq_ref, _, _ = _np_nce(q, kp, bank, TAU)
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl)
    tol = 1e-10 if q_dtype == torch.float64 else (2e-5 if q_dtype == torch.float32 else 2e-3)
    np.testing.assert_allclose(loss.double().numpy(), loss_ref, rtol=tol, atol=tol, err_msg=f"seed={seed}")
    assert dq.dtype == q_dtype
