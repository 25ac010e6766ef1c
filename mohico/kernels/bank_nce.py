"""Memory-bank NCE (MoCo/MCL, docs/METHODS.md §1.4) without materialising the B x K logits.

Per sample ``i`` (q, keys L2-normalised by the caller)::

    L_i = -q_i.k+_i / tau + logsumexp([q_i.k+_i, q_i.bank_1, ..., q_i.bank_K] / tau)

Gradients flow to ``q`` only. ``k_pos`` comes from the momentum (EMA) encoder and
``bank_keys`` from the FIFO queue; both are constants of the step (MoCo), so they get no
gradient even if they require it (they are used detached).

Implementations (``impl=``):

- ``None``: dispatch -- Triton when ``q`` is a CUDA tensor and triton imports, chunked
  PyTorch otherwise.
- ``"torch"``: chunked PyTorch. Streams the bank in tiles of ``TILE`` rows with an online
  max / sum; a custom autograd Function recomputes the tiles in backward (second streaming
  pass). Peak extra memory O(B * TILE), never O(B * K).
- ``"reference"``: naive, materialises the logits; the test oracle.
- ``"triton"``: the fused kernels in ``bank_nce_triton.py`` (same math, same streaming). On
  CPU tensors only under the interpreter (``TRITON_INTERPRET=1`` set before the kernel module
  is first imported); otherwise :class:`KernelUnavailableError`.

Own-video masking (``q_ids: (B,)``, ``bank_ids: (K,)`` int64, both or neither): bank entry ``j``
is left out of query ``i``'s log-sum-exp when ``bank_ids[j] == q_ids[i]`` (a clip of the query's
own video is not a negative). A negative id means "unknown" and never masks. Every
implementation applies the mask, forward and backward; a query whose every bank entry is
masked gets ``bank_lse = -inf`` with zero gradient, like an empty shard.

Second derivatives (``create_graph=True``) are exact but go through a differentiable
recomputation that materialises the B x K logits (MCL's MAL differentiates q.k+, not this loss).

Accumulation dtype: float32 for float16 / bfloat16 / float32 inputs, float64 for float64.
Outputs are in the accumulation dtype (a float16 loss would lose the small differences
that matter); ``dq`` is returned in ``q``'s dtype.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from mohico.errors import MohicoError

TILE = 4096  # bank rows per streamed tile in the chunked PyTorch path

IMPLS = (None, "torch", "reference", "triton")


class KernelUnavailableError(MohicoError, RuntimeError):
    """impl='triton' was asked for where Triton cannot run (exit code 1 from the CLI)."""


def no_autocast(fn):
    """Run ``fn`` with autocast off on its first tensor argument's device: these ops choose their
    own precision (float32 accumulation); autocast would turn the logit matmuls into bf16/fp16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next(a for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(t.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q: torch.Tensor, bank_keys: torch.Tensor, k_pos: torch.Tensor | None = None,
           q_ids: torch.Tensor | None = None, bank_ids: torch.Tensor | None = None) -> None:
    if q.dim() != 2:
        raise ValueError(f"q must be (B, d), got shape {tuple(q.shape)}")
    if bank_keys.dim() != 2 or bank_keys.shape[1] != q.shape[1]:
        raise ValueError(f"bank_keys must be (K, d={q.shape[1]}), got shape {tuple(bank_keys.shape)}")
    if k_pos is not None and k_pos.shape != q.shape:
        raise ValueError(f"k_pos must match q's shape {tuple(q.shape)}, got {tuple(k_pos.shape)}")
    if bank_keys.device != q.device:
        raise ValueError(f"bank_keys is on {bank_keys.device} but q is on {q.device}")
    if (q_ids is None) != (bank_ids is None):
        raise ValueError("own-video masking needs both q_ids (B,) and bank_ids (K,), or neither")
    if q_ids is not None:
        if q_ids.shape != (q.shape[0],) or bank_ids.shape != (bank_keys.shape[0],):
            raise ValueError(f"q_ids must be ({q.shape[0]},) and bank_ids ({bank_keys.shape[0]},); got "
                             f"{tuple(q_ids.shape)} and {tuple(bank_ids.shape)}")
        if q_ids.dtype != torch.int64 or bank_ids.dtype != torch.int64:
            raise ValueError(f"q_ids and bank_ids must be int64 video ids; got {q_ids.dtype}, {bank_ids.dtype}")
        if q_ids.device != q.device or bank_ids.device != q.device:
            raise ValueError(f"q_ids ({q_ids.device}) and bank_ids ({bank_ids.device}) must be on q's device {q.device}")


def same_video(q_ids: torch.Tensor, bank_ids: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool: bank entry ``j`` belongs to query ``i``'s video (negative ids never match)."""
    return (q_ids[:, None] == bank_ids[None, :]) & (bank_ids[None, :] >= 0)


def masked_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits, 1)`` where a row of all ``-inf`` gives ``-inf`` with a zero gradient
    (``torch.logsumexp``'s backward gives nan there)."""
    empty = torch.isneginf(logits).all(dim=1, keepdim=True)
    if not bool(empty.any()):
        return torch.logsumexp(logits, dim=1)
    lse = torch.logsumexp(logits.masked_fill(empty, 0.0), dim=1)
    return torch.where(empty[:, 0], torch.full_like(lse, float("-inf")), lse)


def triton_usable(t: torch.Tensor, module: str = "bank_nce_triton") -> bool:
    """True when the Triton kernels of ``mohico.kernels.<module>`` can run on tensor ``t``.

    CUDA tensors need triton. CPU tensors need the kernels built by the interpreter:
    triton decides that when the ``@triton.jit`` decorators run (module import), so
    ``TRITON_INTERPRET=1`` must be set before the kernel module is first imported.
    """
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton ships with torch's CUDA wheels
        return False
    mod = sys.modules.get(f"{__package__}.{module}")
    interpreted = mod.INTERPRETED if mod is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"
    return t.is_cuda != interpreted


def _resolve(impl: str | None, q: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl is None:
        return "triton" if (q.is_cuda and triton_usable(q)) else "torch"
    if impl == "triton" and not triton_usable(q):
        raise KernelUnavailableError(
            f"impl='triton' needs CUDA tensors (got {q.device}), or TRITON_INTERPRET=1 set before "
            "mohico.kernels.bank_nce_triton is first imported (CPU interpreter); use impl='torch' "
            "or impl=None (auto) instead")
    return impl


# ----------------------------------------------------------------------------- chunked torch
def _lse_forward_torch(q: torch.Tensor, bank: torch.Tensor, pos: torch.Tensor | None,
                       inv_tau: float, tile: int, q_ids: torch.Tensor | None = None,
                       bank_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Streaming log-sum-exp over ``[pos, q @ bank.T] * inv_tau`` (pos: (B,) logits or None),
    bank entries of the query's own video (``q_ids``/``bank_ids``) left out.

    ``q`` is already in the accumulation dtype; bank tiles are cast tile by tile.
    """
    B = q.shape[0]
    if pos is None:
        m = torch.full((B,), float("-inf"), dtype=q.dtype, device=q.device)
        s = torch.zeros(B, dtype=q.dtype, device=q.device)
    else:
        m = pos * inv_tau
        s = torch.ones(B, dtype=q.dtype, device=q.device)
    q_s = q * inv_tau  # scale the (B, d) queries once, not every (B, tile) logit tile
    for start in range(0, bank.shape[0], tile):
        logits = q_s @ bank[start:start + tile].to(q.dtype).T  # (B, tile), the only big temporary
        if q_ids is not None:
            logits.masked_fill_(same_video(q_ids, bank_ids[start:start + tile]), float("-inf"))
        m_new = torch.maximum(m, logits.amax(dim=1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # -inf: nothing seen yet
        s = s * torch.exp(m - m_safe) + logits.sub_(m_safe[:, None]).exp_().sum(dim=1)
        m = m_new
    # s == 0 only for an empty set (m == -inf): log(0) = -inf, and -inf + -inf = -inf.
    return torch.where(s > 0, m + torch.log(s), torch.full_like(m, float("-inf")))


def _lse_backward_torch(q: torch.Tensor, bank: torch.Tensor, lse: torch.Tensor,
                        inv_tau: float, tile: int, q_ids: torch.Tensor | None = None,
                        bank_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j softmax_j * bank_j`` (softmax normalised by ``lse``), streamed over tiles: (B, d)."""
    acc = torch.zeros_like(q)
    if bank.shape[0] == 0:
        return acc
    q_s = q * inv_tau
    for start in range(0, bank.shape[0], tile):
        kt = bank[start:start + tile].to(q.dtype)
        p = (q_s @ kt.T).sub_(lse[:, None]).exp_()  # (B, tile) softmax probabilities
        if q_ids is not None:
            p.masked_fill_(same_video(q_ids, bank_ids[start:start + tile]), 0.0)
        acc.addmm_(p, kt)
    return acc


def _differentiable_dq(q, kp, bank, inv_tau, g, q_ids=None, bank_ids=None):
    """dq = g * softmax @ [k+; bank] / tau with autograd ops, for create_graph=True (second
    derivatives, e.g. gradgradcheck). Materialises the B x K logits: not the training path."""
    acc = _acc_dtype(q.dtype)
    qa, bank = q.to(acc), bank.to(acc)
    if kp is None and bank.shape[0] == 0:
        return torch.zeros_like(q)
    logits = qa @ bank.T * inv_tau
    if q_ids is not None:
        logits = logits.masked_fill(same_video(q_ids, bank_ids), float("-inf"))
    if kp is not None:  # the positive is per sample: column 0
        logits = torch.cat([(qa * kp).sum(dim=1, keepdim=True) * inv_tau, logits], dim=1)
    empty = torch.isneginf(logits).all(dim=1, keepdim=True)  # every entry masked: no gradient
    p = torch.softmax(logits.masked_fill(empty, 0.0), dim=1).masked_fill(empty, 0.0)
    mix = p @ bank if kp is None else p[:, 1:] @ bank + p[:, :1] * kp
    return (mix * (g.to(acc) * inv_tau)[:, None]).to(q.dtype)


class _StreamingLSE(torch.autograd.Function):
    """lse_i = logsumexp([q_i.k+_i (optional), q_i @ bank.T] / tau); grad w.r.t. q only."""

    @staticmethod
    def forward(ctx, q, k_pos, bank, tau, impl, tile, splits, q_ids=None, bank_ids=None):
        acc = _acc_dtype(q.dtype)
        inv_tau = 1.0 / float(tau)
        q_acc = q.detach().to(acc)
        bank = bank.detach()
        kp = None if k_pos is None else k_pos.detach().to(acc)
        if impl == "triton":  # the kernel reads q in its own dtype and accumulates in `acc`
            from .bank_nce_triton import lse_forward_triton

            q_acc = q.detach()
            lse = lse_forward_triton(q_acc, bank, kp, inv_tau, splits=splits, q_ids=q_ids, bank_ids=bank_ids)
        else:
            pos = None if kp is None else (q_acc * kp).sum(dim=1)
            lse = _lse_forward_torch(q_acc, bank, pos, inv_tau, tile, q_ids, bank_ids)
        ctx.save_for_backward(q_acc, kp if kp is not None else lse.new_empty(0), bank, lse, q)
        ctx.has_pos, ctx.inv_tau, ctx.impl, ctx.tile, ctx.splits = kp is not None, inv_tau, impl, tile, splits
        ctx.q_dtype = q.dtype
        ctx.ids = (q_ids, bank_ids)
        return lse

    @staticmethod
    @no_autocast
    def backward(ctx, g):
        q_acc, kp, bank, lse, q = ctx.saved_tensors
        kp = kp if ctx.has_pos else None
        q_ids, bank_ids = ctx.ids
        nones = (None,) * 8
        if torch.is_grad_enabled():  # create_graph=True: differentiable (double backward) path
            return (_differentiable_dq(q, kp, bank, ctx.inv_tau, g, q_ids, bank_ids),) + nones
        g = g.to(lse.dtype)
        if ctx.impl == "triton":
            from .bank_nce_triton import lse_backward_triton

            dq = lse_backward_triton(q_acc, bank, kp, lse, g, ctx.inv_tau, splits=ctx.splits,
                                     q_ids=q_ids, bank_ids=bank_ids)
        else:
            acc = _lse_backward_torch(q_acc, bank, lse, ctx.inv_tau, ctx.tile, q_ids, bank_ids)
            if kp is not None:
                p_pos = torch.exp((q_acc * kp).sum(dim=1) * ctx.inv_tau - lse)
                acc = acc + p_pos[:, None] * kp
            # An empty set (lse = -inf) has no gradient; keep it 0, not nan.
            scale = torch.where(torch.isfinite(lse), g, torch.zeros_like(g)) * ctx.inv_tau
            dq = acc * scale[:, None]
        return (dq.to(ctx.q_dtype),) + nones


# ----------------------------------------------------------------------------- public API
@no_autocast
def bank_lse(q: torch.Tensor, bank_keys: torch.Tensor, tau: float, impl: str | None = None,
             *, q_ids: torch.Tensor | None = None, bank_ids: torch.Tensor | None = None,
             tile: int = TILE, splits: int | None = None) -> torch.Tensor:
    """Partial log-sum-exp of ``q @ bank_keys.T / tau`` over one bank shard.

    q: (B, d); bank_keys: (K, d), K may be 0 (returns -inf). Returns (B,) in float32
    (float64 for float64 inputs). Differentiable w.r.t. ``q`` (d lse / dq = softmax @ bank / tau);
    the bank gets no gradient. A distributed bank combines shards with
    ``torch.logsumexp(torch.stack(partials), 0)`` (after an all-gather of the (B,) partials).
    ``q_ids: (B,)``, ``bank_ids: (K,)`` int64: leave out each query's own video (module docstring).
    """
    _check(q, bank_keys, None, q_ids, bank_ids)
    impl = _resolve(impl, q)
    if impl == "reference":
        acc = _acc_dtype(q.dtype)
        logits = (q.to(acc) @ bank_keys.detach().to(acc).T) / tau
        if q_ids is not None:
            logits = logits.masked_fill(same_video(q_ids, bank_ids), float("-inf"))
        return masked_logsumexp(logits) if q_ids is not None else torch.logsumexp(logits, dim=1)
    return _StreamingLSE.apply(q, None, bank_keys, float(tau), impl, int(tile), splits, q_ids, bank_ids)


@no_autocast
def bank_nce(q: torch.Tensor, k_pos: torch.Tensor, bank_keys: torch.Tensor, tau: float,
             impl: str | None = None, *, q_ids: torch.Tensor | None = None, bank_ids: torch.Tensor | None = None,
             tile: int = TILE, splits: int | None = None) -> torch.Tensor:
    """Per-sample InfoNCE loss against one positive and a bank of negatives.

    q: (B, d) queries; k_pos: (B, d) positive keys; bank_keys: (K, d) negatives (K may be 0,
    then the loss is 0). Returns (B,) ``-q.k+/tau + logsumexp([q.k+, q @ bank.T] / tau)``
    in float32 (float64 for float64 inputs); take ``.mean()`` for the batch loss.
    Differentiable w.r.t. ``q`` only: dq = (sum_j softmax_j k_j - k+) / tau.
    ``tile`` (bank rows per step, "torch") and ``splits`` (bank ranges run in parallel,
    "triton"; default fills the GPU) only change speed and memory, not the result.
    ``q_ids: (B,)``, ``bank_ids: (K,)`` int64: leave out each query's own video (module docstring).
    """
    _check(q, bank_keys, k_pos, q_ids, bank_ids)
    impl = _resolve(impl, q)
    acc = _acc_dtype(q.dtype)
    inv_tau = 1.0 / float(tau)
    kp = k_pos.detach().to(acc)
    pos = (q.to(acc) * kp).sum(dim=1) * inv_tau  # (B,), differentiable w.r.t. q
    if impl == "reference":
        neg = (q.to(acc) @ bank_keys.detach().to(acc).T) * inv_tau
        if q_ids is not None:
            neg = neg.masked_fill(same_video(q_ids, bank_ids), float("-inf"))
        return torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos
    lse = _StreamingLSE.apply(q, kp, bank_keys, float(tau), impl, int(tile), splits, q_ids, bank_ids)
    return lse - pos
