"""Own-video masking in the memory-bank NCE / partial LSE: every implementation (reference,
chunked PyTorch, Triton under the CPU interpreter) against a float64 numpy reference that drops
the masked entries, forward and backward, including queries whose every bank entry is masked.
"""
from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mohico.kernels import bank_lse, bank_nce
from mohico.kernels import bank_nce_triton as bt  # built interpreted (TRITON_INTERPRET=1 from conftest.py)

TAU = 0.07
IMPLS = ["torch", "triton", "reference"]


def _data(B, K, d, n_videos, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    kp = F.normalize(q + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1)
    # bank ids: a few videos plus "unknown" (-1) slots; query ids drawn from the same videos
    bank_ids = torch.randint(-1, n_videos, (K,), generator=g)
    q_ids = torch.randint(0, n_videos, (B,), generator=g)
    return q.to(dtype), kp.to(dtype), bank.to(dtype), q_ids, bank_ids


def _np_masked(q, kp, bank, tau, q_ids, bank_ids):
    """float64 numpy with an explicit loop over queries: each query keeps only the bank rows of
    other videos (or unknown id -1). Returns loss, dq, bank-only lse (-inf if none left), its dq."""
    q, kp, bank = (np.asarray(t.detach().double().numpy(), np.float64) for t in (q, kp, bank))
    B, d = q.shape
    loss, dq, lse_b, dq_b = np.zeros(B), np.zeros((B, d)), np.full(B, -np.inf), np.zeros((B, d))
    for i in range(B):
        keep = [j for j in range(bank.shape[0]) if bank_ids[j] < 0 or bank_ids[j] != q_ids[i]]
        negs = bank[keep]
        pos = q[i] @ kp[i] / tau
        logits = np.concatenate([[pos], negs @ q[i] / tau])
        m = logits.max()
        p = np.exp(logits - m)
        loss[i] = np.log(p.sum()) + m - pos
        p /= p.sum()
        dq[i] = (p[0] * kp[i] + p[1:] @ negs - kp[i]) / tau
        if keep:
            nl = negs @ q[i] / tau
            mb = nl.max()
            pb = np.exp(nl - mb)
            lse_b[i] = np.log(pb.sum()) + mb
            dq_b[i] = (pb / pb.sum()) @ negs / tau
    return loss, dq, lse_b, dq_b


def _run(fn, q, *args, **kw):
    q = q.detach().clone().requires_grad_()
    out = fn(q, *args, **kw)
    (dq,) = torch.autograd.grad(out.sum(), q)
    return out.detach(), dq


@pytest.mark.parametrize("B,K,n_videos", [(7, 200, 3), (33, 1000, 8), (5, 3, 1)])
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_nce_and_lse_match_numpy_float64(B, K, n_videos, impl):
    seed = secrets.randbits(31)
    q, kp, bank, q_ids, bank_ids = _data(B, K, 64, n_videos, seed)
    if K == 3:                                      # every bank entry of query 0 is its own video
        bank_ids[:] = q_ids[0]
    loss_ref, dq_ref, lse_ref, dqb_ref = _np_masked(q, kp, bank, TAU, q_ids, bank_ids)
    kw = {"tile": 97} if impl == "torch" else ({"splits": 3} if impl == "triton" else {})
    ids = dict(q_ids=q_ids, bank_ids=bank_ids)
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl, **ids, **kw)
    lse, dqb = _run(bank_lse, q, bank, TAU, impl=impl, **ids, **kw)
    for got, ref in ((loss, loss_ref), (dq, dq_ref), (lse, lse_ref), (dqb, dqb_ref)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-10, err_msg=f"seed={seed} impl={impl}")
    # the mask matters: without ids the loss differs wherever a query's video is in the bank
    unmasked = bank_nce(q, kp, bank, TAU, impl=impl, **kw)
    has_own = (bank_ids[None, :] == q_ids[:, None]).any(1)
    assert has_own.any() and (unmasked[has_own] > loss[has_own] + 1e-9).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_masked_float32_matches_reference(impl):
    seed = secrets.randbits(31)
    q, kp, bank, q_ids, bank_ids = _data(9, 500, 64, 4, seed, torch.float32)
    loss_ref, dq_ref, lse_ref, _ = _np_masked(q, kp, bank, TAU, q_ids, bank_ids)
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl, q_ids=q_ids, bank_ids=bank_ids)
    np.testing.assert_allclose(loss.double().numpy(), loss_ref, rtol=2e-5, atol=2e-5, err_msg=f"seed={seed}")
    np.testing.assert_allclose(dq.double().numpy(), dq_ref, rtol=0, atol=2e-5 * np.abs(dq_ref).max(),
                               err_msg=f"seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_masked_gradcheck(impl):
    seed = secrets.randbits(31)
    q, kp, bank, q_ids, bank_ids = _data(4, 37, 16, 3, seed)
    bank_ids[:5] = q_ids[1]
    kw = {"tile": 8} if impl == "torch" else ({"splits": 2} if impl == "triton" else {})
    ids = dict(q_ids=q_ids, bank_ids=bank_ids)
    q = (q * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: bank_nce(x, kp, bank, 0.5, impl=impl, **ids, **kw), (q,))
    assert torch.autograd.gradcheck(lambda x: bank_lse(x, bank, 0.5, impl=impl, **ids, **kw), (q,))


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_fully_masked_query_has_minus_inf_lse_and_zero_gradient(impl):
    q, kp, bank, _, _ = _data(3, 50, 32, 1, secrets.randbits(31))
    q_ids = torch.tensor([4, 4, 9])
    bank_ids = torch.full((50,), 4)
    lse, dqb = _run(bank_lse, q, bank, TAU, impl=impl, q_ids=q_ids, bank_ids=bank_ids)
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2])
    assert torch.equal(dqb[:2], torch.zeros_like(dqb[:2])) and torch.isfinite(dqb).all()
    loss, dq = _run(bank_nce, q, kp, bank, TAU, impl=impl, q_ids=q_ids, bank_ids=bank_ids)
    assert loss[:2].abs().max() < 1e-12 and dq[:2].abs().max() < 1e-12   # only the positive is left


def test_triton_masked_partials_over_splits_write_every_element():
    seed = secrets.randbits(31)
    q, _, bank, q_ids, bank_ids = _data(17, 640, 64, 2, seed)
    _, _, lse_ref, dqb_ref = _np_masked(q, q, bank, TAU, q_ids, bank_ids)
    for splits in (1, 4, 10):
        m, s = bt.lse_partials_triton(q, bank, 1 / TAU, None, splits, q_ids=q_ids, bank_ids=bank_ids)
        assert not torch.isnan(m).any() and not torch.isnan(s).any(), f"splits={splits} seed={seed}"
        lse = bt.combine_partials(m, s)
        np.testing.assert_allclose(lse.numpy(), lse_ref, rtol=1e-12, err_msg=f"seed={seed}")
        dq = bt.lse_backward_triton(q, bank, None, lse, torch.ones(17, dtype=torch.float64), 1 / TAU, splits,
                                    q_ids=q_ids, bank_ids=bank_ids)
        np.testing.assert_allclose(dq.numpy(), dqb_ref, rtol=1e-10, atol=1e-12, err_msg=f"seed={seed}")


def test_bad_ids_raise():
    q, kp, bank, q_ids, bank_ids = _data(3, 10, 8, 2, 0)
    with pytest.raises(ValueError, match="both"):
        bank_nce(q, kp, bank, TAU, q_ids=q_ids)
    with pytest.raises(ValueError, match="q_ids must be"):
        bank_lse(q, bank, TAU, q_ids=q_ids[:2], bank_ids=bank_ids)
    with pytest.raises(ValueError, match="int64"):
        bank_lse(q, bank, TAU, q_ids=q_ids.int(), bank_ids=bank_ids)
