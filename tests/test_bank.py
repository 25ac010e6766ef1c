"""MemoryBank: NCE against a float64 numpy reference, FIFO wrap-around, state round trip,
resharding, gradcheck of the sharded-LSE Function, and the 2-rank gloo bank against one
process holding the whole bank (float64, 1e-10 relative)."""
from __future__ import annotations


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


def _np_nce(q, kpos, bank, tau):
    """Eq. 10 in float64 numpy: -log(e^{q.k+/t} / (e^{q.k+/t} + sum_k e^{q.k/t})) per row."""
    q, kpos, bank = (np.asarray(x, dtype=np.float64) for x in (q, kpos, bank))
    pos = (q * kpos).sum(1) / tau
    neg = q @ bank.T / tau
    allv = np.concatenate([pos[:, None], neg], 1)
    m = allv.max(1, keepdims=True)
    lse = (m + np.log(np.exp(allv - m).sum(1, keepdims=True)))[:, 0]
    return lse - pos


def _np_nce_grad(q, kpos, bank, tau):
    """d(sum_i L_i)/dq: (softmax-weighted keys - k+) / tau."""
    keys = np.concatenate([kpos[:, None, :], np.broadcast_to(bank, (q.shape[0],) + bank.shape)], 1)
    logits = np.einsum("bd,bkd->bk", q, keys) / tau
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (np.einsum("bk,bkd->bd", p, keys) - kpos) / tau


# --------------------------------------------------------------------------- single process
def test_nce_matches_numpy_and_counts_only_filled_slots():
    bank = MemoryBank(16, 8, dtype=torch.float64)
    keys = _unit(11, 8, 0)
    bank.enqueue(keys)                       # 11 of 16 slots filled: the 5 zero slots must not count
    assert bank.filled == 11 and bank.fill == pytest.approx(11 / 16)
    q = _unit(5, 8, 1).requires_grad_(True)
    kp = _unit(5, 8, 2)
    loss = bank.nce(q, kp, 0.1)
    ref = _np_nce(q.detach().numpy(), kp.numpy(), keys.numpy(), 0.1)
    np.testing.assert_allclose(loss.detach().numpy(), ref, rtol=1e-12)
    loss.sum().backward()
    np.testing.assert_allclose(q.grad.numpy(), _np_nce_grad(q.detach().numpy(), kp.numpy(), keys.numpy(), 0.1),
                               rtol=1e-10, atol=1e-12)
    lse = bank.logits_lse(q.detach(), 0.1)
    neg = q.detach().numpy() @ keys.numpy().T / 0.1
    np.testing.assert_allclose(lse.numpy(), np.log(np.exp(neg).sum(1)), rtol=1e-12)


def test_enqueue_between_loss_and_backward_keeps_the_gradient():
    bank = MemoryBank(8, 6, dtype=torch.float64)
    keys = _unit(8, 6, 20)
    bank.enqueue(keys)
    q, kp = _unit(4, 6, 21).requires_grad_(True), _unit(4, 6, 22)
    loss = bank.nce(q, kp, 0.2)
    bank.enqueue(_unit(4, 6, 23))            # MoCo order: loss, enqueue, then backward
    loss.sum().backward()
    np.testing.assert_allclose(q.grad.numpy(), _np_nce_grad(q.detach().numpy(), kp.numpy(), keys.numpy(), 0.2),
                               rtol=1e-10, atol=1e-12)


def test_empty_bank_gives_zero_loss_and_no_nan():
    bank = MemoryBank(8, 4, dtype=torch.float64)
    q = _unit(3, 4, 0).requires_grad_(True)
    loss = bank.nce(q, _unit(3, 4, 1), 0.1)
    assert torch.allclose(loss, torch.zeros(3, dtype=torch.float64))
    loss.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_enqueue_wraps_around_fifo():
    bank = MemoryBank(8, 4, dtype=torch.float64)
    k = _unit(30, 4, 3)
    bank.enqueue(k[:3]); bank.enqueue(k[3:6])
    assert (bank.ptr, bank.filled) == (6, 6)
    torch.testing.assert_close(bank.ordered_keys(), k[:6])
    bank.enqueue(k[6:11])                    # wraps: slots 6, 7 then 0, 1, 2
    assert (bank.ptr, bank.filled) == (3, 8)
    torch.testing.assert_close(bank.keys[:3], k[8:11])
    torch.testing.assert_close(bank.keys[6:], k[6:8])
    torch.testing.assert_close(bank.ordered_keys(), k[3:11])   # the oldest three (0..2) evicted
    bank.enqueue(k[11:21])                   # more than the shard at once: the newest 8 survive
    assert (bank.ptr, bank.filled) == (5, 8)
    torch.testing.assert_close(bank.ordered_keys(), k[13:21])
    bank.enqueue(k[21:22] * 5.0)             # keys are L2-normalised on the way in
    torch.testing.assert_close(bank.ordered_keys()[-1], k[21])
    with pytest.raises(MohicoError, match=r"\(n, 4\)"):
        bank.enqueue(torch.zeros(2, 5))


def test_state_round_trip_and_mismatch_errors():
    a = MemoryBank(8, 4, dtype=torch.float64)
    a.enqueue(_unit(11, 4, 4))
    state = a.state_dict()
    b = MemoryBank(8, 4, dtype=torch.float64)
    b.load_state_dict(state)
    assert (b.ptr, b.filled) == (a.ptr, a.filled)
    torch.testing.assert_close(b.keys, a.keys)
    k = _unit(2, 4, 5)
    a.enqueue(k); b.enqueue(k)               # the queue continues identically
    torch.testing.assert_close(b.ordered_keys(), a.ordered_keys())
    with pytest.raises(MohicoError, match="bank.size"):
        MemoryBank(16, 4).load_state_dict(state)
    other = dict(state, world_size=2, rank=1)
    with pytest.raises(MohicoError, match="reshard"):
        MemoryBank(8, 4).load_state_dict(other)
    with pytest.raises(MohicoError, match="not a memory-bank state"):
        MemoryBank(8, 4).load_state_dict({"keys": state["keys"]})
    with pytest.raises(MohicoError, match="corrupt"):
        MemoryBank(8, 4).load_state_dict(dict(state, ptr=99))


def _fake_states(world, size, dim, fills, seed=0):
    """Per-rank states of a bank in lockstep, built by real MemoryBank shards."""
    states = []
    for r in range(world):
        b = MemoryBank.__new__(MemoryBank)
        b.group, b.rank, b.world_size, b.size, b.dim, b.impl = None, r, world, size, dim, None
        b.shard_size = size // world
        b.keys, b.ptr, b.filled = torch.zeros(b.shard_size, dim, dtype=torch.float64), 0, 0
        b.ids = torch.full((b.shard_size,), -1, dtype=torch.int64)
        for step in range(fills[r]):
            b.enqueue(_unit(1, dim, seed + 1000 * r + step), ids=torch.tensor([1000 * r + step]))
        states.append(b.state_dict())
    return states


@pytest.mark.parametrize("fills", [(13, 13), (5, 5), (6, 5)])
def test_reshard_2_1_2_preserves_keys_in_order(fills):
    states = _fake_states(2, 16, 4, fills)              # shard 8 each; 13 enqueues wrap around
    one = MemoryBank.reshard(states, 1)
    assert len(one) == 1 and one[0]["world_size"] == 1 and one[0]["keys"].shape == (16, 4)
    kept = [min(f, 8) for f in fills]
    assert one[0]["filled"] == sum(kept)
    back = MemoryBank.reshard(one, 2)
    for old, new in zip(states, back):
        torch.testing.assert_close(_ordered(new), _ordered(old))
        assert torch.equal(_ordered(new, "ids"), _ordered(old, "ids"))       # each key keeps its video id
        assert new["filled"] == old["filled"] and new["rank"] == old["rank"]
    # the single shard is in age order: its newest keys are the ranks' newest, interleaved
    merged = _ordered(one[0])
    torch.testing.assert_close(merged[-1], _ordered(states[0])[-1])
    torch.testing.assert_close(merged[-2], _ordered(states[1])[-1])
    b = MemoryBank(16, 4, dtype=torch.float64)
    b.load_state_dict(one[0])                           # a resharded state loads and keeps queueing
    b.enqueue(_unit(3, 4, 99))
    assert b.filled == min(16, sum(kept) + 3)
    four = MemoryBank.reshard(states, 4)                # 2 -> 4 -> 2 as well
    assert [s["keys"].shape[0] for s in four] == [4] * 4 and sum(s["filled"] for s in four) == sum(kept)
    for old, new in zip(states, MemoryBank.reshard(four, 2)):
        torch.testing.assert_close(_ordered(new), _ordered(old))
        assert torch.equal(_ordered(new, "ids"), _ordered(old, "ids"))


def test_reshard_errors():
    states = _fake_states(2, 16, 4, (3, 3))
    with pytest.raises(MohicoError, match="divisible"):
        MemoryBank.reshard(states, 3)
    with pytest.raises(MohicoError, match="one state per rank"):
        MemoryBank.reshard(states[:1], 1)
    with pytest.raises(MohicoError, match="one state per rank"):
        MemoryBank.reshard([states[0], states[0]], 1)


def test_gradcheck_sharded_lse_function():
    q = _unit(4, 6, 7).requires_grad_(True)
    keys = _unit(9, 6, 8)
    assert torch.autograd.gradcheck(lambda x: ShardedBankLSE.apply(x, keys, 0.3), (q,))
    empty = keys[:0]
    assert torch.autograd.gradcheck(lambda x: ShardedBankLSE.apply(x, empty, 0.3)
                                    .clamp(min=-1e30), (q,))   # -inf rows: zero gradient, no nan
    out = ShardedBankLSE.apply(q, keys, 0.3)
    torch.testing.assert_close(out, torch.logsumexp(q.detach() @ keys.T / 0.3, 1))


# --------------------------------------------------------------------------- 2 gloo ranks
def _dist_worker(rank, world):
    B, d, tau = 3, 8, 0.1
    q_all, kp_all = _unit(B * world, d, 10), _unit(B * world, d, 11)
    results = {}
    # case "full": 2 x 12 keys enqueued with wrap-around; "partial": 5 keys each;
    # "lopsided": only rank 0 holds keys (rank 1's shard is empty).
    for case, counts in (("full", (15, 15)), ("partial", (5, 5)), ("lopsided", (7, 0))):
        bank = MemoryBank(16, d, dtype=torch.float64)
        assert bank.shard_size == 8 and bank.world_size == world
        if counts[rank]:
            bank.enqueue(_unit(counts[rank], d, 100 + rank))
        q = q_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss = bank.nce(q, kp_all[rank * B:(rank + 1) * B], tau)
        loss.sum().backward()
        lse = bank.logits_lse(q.detach(), tau)
        results[case] = (loss.detach(), q.grad.clone(), lse, bank.filled)
    return results


@pytest.mark.dist
def test_two_gloo_ranks_match_one_process_with_the_whole_bank(tmp_path):
    world, B, d, tau = 2, 3, 8, 0.1
    res = run_gloo(_dist_worker, world)
    q_all, kp_all = _unit(B * world, d, 10), _unit(B * world, d, 11)
    for case, counts in (("full", (15, 15)), ("partial", (5, 5)), ("lopsided", (7, 0))):
        shards = []
        for r in range(world):
            if counts[r]:
                kk = _unit(counts[r], d, 100 + r)[-8:]       # the shard keeps its newest 8
                shards.append(kk)
        whole_keys = torch.cat(shards, 0)
        whole = MemoryBank(whole_keys.shape[0], d, dtype=torch.float64)   # one process, the whole bank
        whole.enqueue(whole_keys)
        q = q_all.clone().requires_grad_(True)
        loss = whole.nce(q, kp_all, tau)
        loss.sum().backward()
        dist_loss = torch.cat([res[r][case][0] for r in range(world)])
        dist_grad = torch.cat([res[r][case][1] for r in range(world)])
        dist_lse = torch.cat([res[r][case][2] for r in range(world)])
        assert torch.allclose(dist_loss, loss.detach(), rtol=1e-10, atol=0), case
        assert torch.allclose(dist_grad, q.grad, rtol=1e-10, atol=1e-14), case
        assert torch.allclose(dist_lse, torch.logsumexp(q_all @ whole_keys.T / tau, 1), rtol=1e-10, atol=0), case
        np.testing.assert_allclose(dist_loss.numpy(), _np_nce(q_all.numpy(), kp_all.numpy(), whole_keys.numpy(), tau),
                                   rtol=1e-10)
        assert [res[r][case][3] for r in range(world)] == [min(c, 8) for c in counts]


def test_size_not_divisible_names_bank_size(monkeypatch):
    import mohico.models.bank as bank_mod

    monkeypatch.setattr(bank_mod, "rank_world", lambda group=None: (0, 3))
    with pytest.raises(MohicoError, match="bank.size = 16 is not divisible"):
        MemoryBank(16, 4)


def test_a_bank_too_big_to_allocate_names_bank_size_and_its_memory():
    with pytest.raises(MohicoError) as e:            # 2**40 keys x 128: 512 TiB, no machine has it
        MemoryBank(2 ** 40, 128)
    msg = str(e.value)
    assert "bank.size=1099511627776" in msg and "per rank" in msg and "TiB" not in msg and "GiB" in msg
