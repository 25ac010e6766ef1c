"""Triton kernels for the memory-bank log-sum-exp (forward) and its gradient w.r.t. q (backward).

Both kernels stream the bank in tiles of BLOCK_K rows; the B x K logits live only in
registers, one (BLOCK_B, BLOCK_K) tile at a time. The work is split over a 2-D grid
(query blocks x bank splits) so that a small batch still fills the GPU; each split writes a
partial (max, sum) per query -- the same partial LSE a distributed bank combines across ranks --
and the wrapper merges the splits (O(splits * B)). Backward writes a partial dq per split and
the wrapper sums them (deterministic, no atomics).

Own-video masking (``HAS_IDS``): with int64 ``q_ids: (B,)`` and ``bank_ids: (K,)``, bank entry
``j`` is left out of query ``i``'s sums (forward and backward) when ``bank_ids[j] == q_ids[i]``
and ``bank_ids[j] >= 0`` (a negative id is "unknown" and never masks).

Accumulation is float32 for float16 / bfloat16 / float32 inputs and float64 for float64.
float32 dots use 3xTF32 on the GPU (float32-level accuracy on tensor cores; plain TF32's 1e-3
relative error would be amplified by 1/tau ~ 10) and IEEE in the interpreter. Half banks use tensor-core dots with float32 accumulation.
(On a GPU the scalar 1/tau is passed as a float32 argument, so float64 there is exact only to
~6e-8 relative; float64 exists for tests, which run in the interpreter with Python floats.)

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set it before this module is imported).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Kernels built by the CPU interpreter (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)
MAX_D = 1024  # the whole embedding row of a tile is held in registers


@contextlib.contextmanager
def launch_env(interpreted: bool):
    """Keep TRITON_INTERPRET=1 while interpreted kernels run (triton re-reads it at launch)."""
    prev = os.environ.get("TRITON_INTERPRET")
    if interpreted:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if interpreted:
            if prev is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = prev


@triton.jit
def _lse_partial_fwd_kernel(Q, KP, BANK, QID, BID, M_OUT, S_OUT, B, K, D, k_per_split, inv_tau,
                            stride_q, stride_kp, stride_bank,
                            HAS_POS: tl.constexpr, HAS_IDS: tl.constexpr, ACC_F64: tl.constexpr, IEEE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_d = offs_d < D
    q = tl.load(Q + offs_b[:, None] * stride_q + offs_d[None, :],
                mask=mask_b[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:  # bf16 dots are wrong in the triton 3.8 CPU interpreter: compute in fp32 there
        q = q.to(acc_t)
    neg_inf = float("-inf")
    if HAS_IDS:
        qid = tl.load(QID + offs_b, mask=mask_b, other=-1)
    m = tl.full((BLOCK_B,), neg_inf, acc_t)
    s = tl.zeros((BLOCK_B,), acc_t)
    if HAS_POS:  # the positive logit opens the stream of split 0 only
        kp = tl.load(KP + offs_b[:, None] * stride_kp + offs_d[None, :],
                     mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        pos = tl.sum(q.to(acc_t) * kp.to(acc_t), axis=1) * inv_tau
        first = pid_k == 0
        m = tl.where(first, pos, m)
        s = tl.where(first, tl.full((BLOCK_B,), 1.0, acc_t), s)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        kt = tl.load(BANK + offs_k[:, None] * stride_bank + offs_d[None, :],
                     mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            logits = tl.dot(q, tl.trans(kt.to(q.dtype)), input_precision=PREC, out_dtype=acc_t)
        else:
            logits = tl.dot(q, tl.trans(kt.to(q.dtype)), out_dtype=acc_t)
        valid = mask_k[None, :]
        if HAS_IDS:
            bid = tl.load(BID + offs_k, mask=mask_k, other=-1)
            valid = valid & ((bid[None, :] != qid[:, None]) | (bid[None, :] < 0))
        logits = tl.where(valid, logits * inv_tau, neg_inf)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # m_new is -inf only while every entry seen so far is masked: shift by 0 then (s stays 0)
        m_safe = tl.where(m_new > neg_inf, m_new, 0.0)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(M_OUT + pid_k * B + offs_b, m, mask=mask_b)
    tl.store(S_OUT + pid_k * B + offs_b, s, mask=mask_b)


@triton.jit
def _lse_partial_bwd_kernel(Q, KP, BANK, QID, BID, LSE, G, DQ_OUT, B, K, D, k_per_split, inv_tau,
                            stride_q, stride_kp, stride_bank,
                            HAS_POS: tl.constexpr, HAS_IDS: tl.constexpr, ACC_F64: tl.constexpr, IEEE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial dq of split pid_k: g * (sum_j softmax_j k_j [+ p_pos k+ on split 0]) / tau."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc_t = tl.float64 if ACC_F64 else tl.float32
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_d = offs_d < D
    mask_bd = mask_b[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_b[:, None] * stride_q + offs_d[None, :], mask=mask_bd, other=0.0)
    if UPCAST:
        q = q.to(acc_t)
    lse = tl.load(LSE + offs_b, mask=mask_b, other=0.0).to(acc_t)
    g = tl.load(G + offs_b, mask=mask_b, other=0.0).to(acc_t)
    finite = lse > float("-inf")  # an empty set has no gradient
    lse = tl.where(finite, lse, 0.0)
    g = tl.where(finite, g, 0.0)
    if HAS_IDS:
        qid = tl.load(QID + offs_b, mask=mask_b, other=-1)
    acc = tl.zeros((BLOCK_B, BLOCK_D), acc_t)
    if HAS_POS:
        kp = tl.load(KP + offs_b[:, None] * stride_kp + offs_d[None, :], mask=mask_bd, other=0.0).to(acc_t)
        p_pos = tl.exp(tl.sum(q.to(acc_t) * kp, axis=1) * inv_tau - lse)
        p_pos = tl.where(pid_k == 0, p_pos, 0.0)
        acc += p_pos[:, None] * kp
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        kt = tl.load(BANK + offs_k[:, None] * stride_bank + offs_d[None, :],
                     mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
        if IEEE:
            logits = tl.dot(q, tl.trans(kt), input_precision=PREC, out_dtype=acc_t)
        else:
            logits = tl.dot(q, tl.trans(kt), out_dtype=acc_t)
        p = tl.exp(logits * inv_tau - lse[:, None])
        valid = mask_k[None, :] & finite[:, None]
        if HAS_IDS:
            bid = tl.load(BID + offs_k, mask=mask_k, other=-1)
            valid = valid & ((bid[None, :] != qid[:, None]) | (bid[None, :] < 0))
        p = tl.where(valid, p, 0.0)
        if IEEE:
            acc += tl.dot(p, kt.to(acc_t), input_precision=PREC, out_dtype=acc_t)
        else:  # half bank: tensor-core dot, float32 accumulation (as flash attention does)
            acc += tl.dot(p.to(kt.dtype), kt, out_dtype=acc_t)
    dq = acc * (g * inv_tau)[:, None]
    tl.store(DQ_OUT + pid_k * B * D + offs_b[:, None] * D + offs_d[None, :], dq, mask=mask_bd)


def _config(q: torch.Tensor, K: int, splits: int | None):
    B, D = q.shape
    if D > MAX_D:
        raise ValueError(f"triton bank kernels hold a whole row in registers: d={D} > {MAX_D}; "
                         "use impl='torch'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"unsupported dtype {q.dtype}")
    if max(K, 1) * D >= 2 ** 31 or B * D >= 2 ** 31:
        raise ValueError(f"triton bank kernels use int32 offsets: K*d = {K}*{D} must stay below 2**31; "
                         "shard the bank (bank_lse per shard) or use impl='torch'")
    block_d = max(16, triton.next_power_of_2(D))
    block_b = 16 if B <= 16 else (32 if B <= 32 or block_d > 128 else 64)
    block_k = 32 if block_d > 256 else 64
    n_bblocks = triton.cdiv(B, block_b)
    n_ktiles = max(1, triton.cdiv(K, block_k))
    if splits is None:
        if q.is_cuda:  # ~2 waves of programs over the SMs
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            splits = max(1, min(n_ktiles, (2 * sms) // n_bblocks))
        else:
            splits = 1
    splits = max(1, min(int(splits), n_ktiles))
    k_per_split = triton.cdiv(n_ktiles, splits) * block_k
    splits = max(1, triton.cdiv(K, k_per_split)) if K > 0 else 1
    upcast = q.dtype == torch.bfloat16 and not q.is_cuda
    ieee = q.dtype in (torch.float32, torch.float64) or upcast  # full-precision dot, not half
    # float32 on GPU: 3xTF32 (tensor cores, ~float32 accuracy); the plain IEEE fp32 dot spills
    # registers heavily on sm_90 (ptxas: ~6 KB stack at 64x64x128 tiles).
    prec = "tf32x3" if (q.is_cuda and q.dtype == torch.float32) else "ieee"
    # q tile + bank tile (+ dq accumulator in backward) live in registers: more warps for big tiles
    num_warps = 8 if block_b * block_d >= 64 * 128 else 4
    return dict(B=B, K=K, D=D, num_warps=num_warps, block_b=block_b, block_k=block_k, block_d=block_d,
                n_bblocks=n_bblocks, splits=splits, k_per_split=k_per_split, ieee=ieee, prec=prec, upcast=upcast,
                acc=torch.float64 if q.dtype == torch.float64 else torch.float32)


def _prep_ids(q, q_ids, bank_ids, K):
    """Contiguous int64 id vectors for the kernels (dummies when not masking; K = 0 never reads BID)."""
    if q_ids is None:
        return q, q, False
    q_ids = q_ids.contiguous()
    return q_ids, (bank_ids.contiguous() if K > 0 else q_ids), True


def _prep(q, bank, k_pos):
    q = q.contiguous() if q.stride(-1) != 1 else q
    bank = bank.contiguous() if bank.stride(-1) != 1 else bank
    if k_pos is not None and k_pos.stride(-1) != 1:
        k_pos = k_pos.contiguous()
    if bank.dtype != q.dtype:  # mixed dtypes: widen q (B x d, cheap); bank tiles convert in registers
        q = q.to(torch.promote_types(q.dtype, bank.dtype))
    if bank.shape[0] == 0:  # never read; avoids handing the kernel a null pointer
        bank = q
        return q, bank, k_pos, 0
    return q, bank, k_pos, bank.shape[0]


def lse_partials_triton(q: torch.Tensor, bank: torch.Tensor, inv_tau: float,
                        k_pos: torch.Tensor | None = None, splits: int | None = None,
                        out: tuple[torch.Tensor, torch.Tensor] | None = None,
                        q_ids: torch.Tensor | None = None, bank_ids: torch.Tensor | None = None):
    """Partial (max, sum) of exp(q @ bank.T * inv_tau) over ``splits`` contiguous bank ranges.

    q: (B, d) any float dtype; bank: (K, d); k_pos: optional (B, d) positives, folded into
    split 0. Returns ``(m, s)`` each (splits, B) in the accumulation dtype, such that
    ``lse = logsumexp_over_splits(m + log s)``. ``out`` may pass preallocated (m, s) buffers.
    ``q_ids: (B,)``, ``bank_ids: (K,)`` int64: leave out each query's own video.
    """
    q, bank, k_pos, K = _prep(q, bank, k_pos)
    qid, bid, has_ids = _prep_ids(q, q_ids, bank_ids, K)
    c = _config(q, K, splits)
    if out is None:
        m = torch.empty((c["splits"], c["B"]), dtype=c["acc"], device=q.device)
        s = torch.empty_like(m)
    else:
        m, s = out
        if m.shape != (c["splits"], c["B"]) or m.dtype != c["acc"] or s.shape != m.shape:
            raise ValueError(f"out buffers must be ({c['splits']}, {c['B']}) {c['acc']}")
    if c["B"] == 0:
        return m, s
    grid = (c["n_bblocks"], c["splits"])
    with launch_env(INTERPRETED):
        _lse_partial_fwd_kernel[grid](
            q, k_pos if k_pos is not None else q, bank, qid, bid, m, s, c["B"], c["K"], c["D"], c["k_per_split"],
            float(inv_tau), q.stride(0), (k_pos if k_pos is not None else q).stride(0),
            bank.stride(0),
            HAS_POS=k_pos is not None, HAS_IDS=has_ids, ACC_F64=c["acc"] == torch.float64, IEEE=c["ieee"], PREC=c["prec"], UPCAST=c["upcast"],
            BLOCK_B=c["block_b"], BLOCK_K=c["block_k"], BLOCK_D=c["block_d"], num_warps=c["num_warps"])
    return m, s


def combine_partials(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Merge (splits, B) partial (max, sum) into the (B,) log-sum-exp (-inf for empty sets)."""
    lse = torch.where(s > 0, m + torch.log(s), torch.full_like(m, float("-inf")))
    return torch.logsumexp(lse, dim=0)


def lse_forward_triton(q, bank, k_pos, inv_tau, splits=None, out=None, q_ids=None, bank_ids=None):
    """(B,) logsumexp([q.k+ (if k_pos given), q @ bank.T] * inv_tau), own-video entries left out."""
    m, s = lse_partials_triton(q, bank, inv_tau, k_pos, splits, out, q_ids, bank_ids)
    return combine_partials(m, s)


def lse_backward_triton(q, bank, k_pos, lse, g, inv_tau, splits=None, out=None, q_ids=None, bank_ids=None):
    """(B, d) g * (softmax @ [k+; bank]) * inv_tau in the accumulation dtype (dq of the lse)."""
    q, bank, k_pos, K = _prep(q, bank, k_pos)
    qid, bid, has_ids = _prep_ids(q, q_ids, bank_ids, K)
    c = _config(q, K, splits)
    if out is None:
        dq = torch.empty((c["splits"], c["B"], c["D"]), dtype=c["acc"], device=q.device)
    else:
        dq = out
        if dq.shape != (c["splits"], c["B"], c["D"]) or dq.dtype != c["acc"] or not dq.is_contiguous():
            raise ValueError(f"out buffer must be contiguous ({c['splits']}, {c['B']}, {c['D']}) {c['acc']}")
    if c["B"] == 0:
        return dq.sum(0)
    grid = (c["n_bblocks"], c["splits"])
    with launch_env(INTERPRETED):
        _lse_partial_bwd_kernel[grid](
            q, k_pos if k_pos is not None else q, bank, qid, bid, lse.contiguous(), g.contiguous(), dq,
            c["B"], c["K"], c["D"], c["k_per_split"], float(inv_tau),
            q.stride(0), (k_pos if k_pos is not None else q).stride(0),
            bank.stride(0),
            HAS_POS=k_pos is not None, HAS_IDS=has_ids, ACC_F64=c["acc"] == torch.float64, IEEE=c["ieee"], PREC=c["prec"], UPCAST=c["upcast"],
            BLOCK_B=c["block_b"], BLOCK_K=c["block_k"], BLOCK_D=c["block_d"], num_warps=c["num_warps"])
    return dq.sum(0)

