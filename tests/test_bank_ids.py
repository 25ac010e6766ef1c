"""MemoryBank own-video masking: per-slot video ids enqueued, masked in the NCE / LSE against a
float64 numpy reference, checkpointed (a version-1 state without ids loads with unknown ids),
resharded with their keys, and the 2-rank gloo bank equal to one process with the whole bank."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mohico.errors import MohicoError
from mohico.models.bank import MemoryBank, ShardedBankLSE, _ordered
from _dist import run_gloo


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _np_masked(q, kp, keys, key_ids, q_ids, tau):
    """float64 numpy, one query at a time: (loss, d sum(loss)/dq, bank-only lse) with the keys
    of the query's own video dropped (-inf lse when none is left)."""
    q, kp, keys = (np.asarray(x, dtype=np.float64) for x in (q, kp, keys))
    loss, grad, lse = np.zeros(len(q)), np.zeros_like(q), np.full(len(q), -np.inf)
    for i in range(len(q)):
        negs = keys[[j for j in range(len(keys)) if key_ids[j] < 0 or key_ids[j] != q_ids[i]]]
        cand = np.concatenate([kp[i:i + 1], negs])
        logits = cand @ q[i] / tau
        p = np.exp(logits - logits.max())
        loss[i] = np.log(p.sum()) + logits.max() - logits[0]
        grad[i] = ((p / p.sum()) @ cand - kp[i]) / tau
        if len(negs):
            lse[i] = np.log(np.exp(logits[1:] - logits[1:].max()).sum()) + logits[1:].max()
    return loss, grad, lse


def test_nce_leaves_out_the_querys_own_video():
    bank = MemoryBank(16, 8, dtype=torch.float64)
    keys, key_ids = _unit(13, 8, 0), torch.tensor([3, 3, 5, 7, 3, 5, 9, 9, 3, 7, 5, 3, 1])
    bank.enqueue(keys[:6], ids=key_ids[:6])
    bank.enqueue(keys[6:], ids=key_ids[6:])
    q_ids = torch.tensor([3, 5, 4, 3, 9])                       # video 4 is not in the bank
    q = _unit(5, 8, 1).requires_grad_(True)
    kp = _unit(5, 8, 2)
    loss = bank.nce(q, kp, 0.1, ids=q_ids)
    ref, ref_grad, ref_lse = _np_masked(q.detach().numpy(), kp.numpy(), keys.numpy(), key_ids, q_ids, 0.1)
    np.testing.assert_allclose(loss.detach().numpy(), ref, rtol=1e-12)
    loss.sum().backward()
    np.testing.assert_allclose(q.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bank.logits_lse(q.detach(), 0.1, ids=q_ids).numpy(), ref_lse, rtol=1e-12)
    unmasked = bank.nce(q.detach(), kp, 0.1)
    assert (unmasked[[0, 1, 3, 4]] > loss.detach()[[0, 1, 3, 4]]).all()
    assert unmasked[2] == pytest.approx(loss[2].item(), rel=1e-12)   # nothing of video 4 to leave out
    with pytest.raises(MohicoError, match="video_id"):
        bank.nce(q, kp, 0.1, ids=q_ids.int())


def test_ids_follow_the_fifo_and_the_checkpoint():
    bank = MemoryBank(8, 4, dtype=torch.float64)
    bank.enqueue(_unit(11, 4, 3), ids=torch.arange(11))        # wraps: slots hold videos 3..10
    assert sorted(bank.ids.tolist()) == list(range(3, 11))
    assert torch.equal(_ordered(bank.state_dict(), "ids"), torch.arange(3, 11))
    bank.enqueue(_unit(2, 4, 4))                                # no ids: unknown, never masked
    assert torch.equal(_ordered(bank.state_dict(), "ids"), torch.tensor([5, 6, 7, 8, 9, 10, -1, -1]))
    other = MemoryBank(8, 4, dtype=torch.float64)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.ids, bank.ids)
    with pytest.raises(MohicoError, match="ids"):
        bank.enqueue(_unit(2, 4, 5), ids=torch.tensor([1]))
    with pytest.raises(MohicoError, match="corrupt"):
        MemoryBank(8, 4).load_state_dict(dict(bank.state_dict(), ids=torch.zeros(3, dtype=torch.int64)))


def test_version_1_state_without_ids_loads_with_unknown_ids(caplog):
    bank = MemoryBank(8, 4, dtype=torch.float64)
    bank.enqueue(_unit(5, 4, 6), ids=torch.full((5,), 2))
    old = {k: v for k, v in bank.state_dict().items() if k != "ids"}
    old["version"] = 1
    fresh = MemoryBank(8, 4, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="mohico.bank"):
        fresh.load_state_dict(old)
    assert "no video ids" in caplog.text
    assert torch.equal(fresh.keys, bank.keys) and (fresh.ids == -1).all()
    q, kp = _unit(2, 4, 7), _unit(2, 4, 8)
    ids = torch.tensor([2, 2])
    torch.testing.assert_close(fresh.nce(q, kp, 0.1, ids=ids), bank.nce(q, kp, 0.1))   # unknown: not masked
    assert MemoryBank.reshard([old], 2)[0]["version"] == 2
    with pytest.raises(MohicoError, match="version 7"):
        fresh.load_state_dict(dict(bank.state_dict(), version=7))


def test_gradcheck_sharded_lse_with_ids():
    q = _unit(4, 6, 7).requires_grad_(True)
    keys = _unit(9, 6, 8)
    key_ids, q_ids = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0]), torch.tensor([0, 1, 3, 1])
    assert torch.autograd.gradcheck(lambda x: ShardedBankLSE.apply(x, keys, 0.3, None, None, q_ids, key_ids), (q,))
    all_own = torch.zeros(9, dtype=torch.int64)                 # query 0 has every key of its own video
    assert torch.autograd.gradcheck(lambda x: ShardedBankLSE.apply(x, keys, 0.3, None, None, q_ids, all_own)
                                    .clamp(min=-1e30), (q,))


# --------------------------------------------------------------------------- 2 gloo ranks
B, D, TAU = 3, 8, 0.1
CASES = {"full": (15, 15), "partial": (5, 5), "lopsided": (7, 0)}


def _key_ids(rank, n):
    """Video ids of a rank's enqueued keys: rank 0 cycles videos 0..3; rank 1 holds only video 3,
    so query video 3 has nothing left on rank 1's shard (a -inf partial)."""
    return torch.arange(n) % 4 if rank == 0 else torch.full((n,), 3)


def _query_ids():
    return torch.tensor([0, 1, 2, 3, 0, 7])                     # 6 queries over 2 ranks; video 7 nowhere


def _dist_worker(rank, world):
    q_all, kp_all = _unit(B * world, D, 10), _unit(B * world, D, 11)
    q_ids = _query_ids()[rank * B:(rank + 1) * B]
    out = {}
    for case, counts in CASES.items():
        bank = MemoryBank(16, D, dtype=torch.float64)
        if counts[rank]:
            bank.enqueue(_unit(counts[rank], D, 100 + rank), ids=_key_ids(rank, counts[rank]))
        q = q_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss = bank.nce(q, kp_all[rank * B:(rank + 1) * B], TAU, ids=q_ids)
        loss.sum().backward()
        out[case] = (loss.detach(), q.grad.clone(), bank.logits_lse(q.detach(), TAU, ids=q_ids))
    return out


@pytest.mark.dist
def test_two_gloo_ranks_with_ids_match_one_process():
    world = 2
    res = run_gloo(_dist_worker, world)
    q_all, kp_all = _unit(B * world, D, 10), _unit(B * world, D, 11)
    for case, counts in CASES.items():
        keys = torch.cat([_unit(c, D, 100 + r)[-8:] for r, c in enumerate(counts) if c])   # each shard keeps 8
        ids = torch.cat([_key_ids(r, c)[-8:] for r, c in enumerate(counts) if c])
        whole = MemoryBank(keys.shape[0], D, dtype=torch.float64)
        whole.enqueue(keys, ids=ids)
        q = q_all.clone().requires_grad_(True)
        loss = whole.nce(q, kp_all, TAU, ids=_query_ids())
        loss.sum().backward()
        got_loss, got_grad, got_lse = (torch.cat([res[r][case][i] for r in range(world)]) for i in range(3))
        ref, ref_grad, ref_lse = _np_masked(q_all.numpy(), kp_all.numpy(), keys.numpy(), ids, _query_ids(), TAU)
        np.testing.assert_allclose(got_loss.numpy(), loss.detach().numpy(), rtol=1e-10, err_msg=case)
        np.testing.assert_allclose(got_loss.numpy(), ref, rtol=1e-10, err_msg=case)
        np.testing.assert_allclose(got_grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13, err_msg=case)
        np.testing.assert_allclose(got_lse.numpy(), ref_lse, rtol=1e-10, err_msg=case)
