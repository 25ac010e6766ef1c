"""Memory-bank NCE (MoCo/MCL, methods.md §1.4) without materialising the B x K logits.

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


def _check(q: torch.Tensor, bank_keys: torch.Tensor, k_pos: torch.Tensor | None = None) -> None:
    if q.dim() != 2:
        raise ValueError(f"q must be (B, d), got shape {tuple(q.shape)}")
    if bank_keys.dim() != 2 or bank_keys.shape[1] != q.shape[1]:
        raise ValueError(f"bank_keys must be (K, d={q.shape[1]}), got shape {tuple(bank_keys.shape)}")
    if k_pos is not None and k_pos.shape != q.shape:
        raise ValueError(f"k_pos must match q's shape {tuple(q.shape)}, got {tuple(k_pos.shape)}")
    if bank_keys.device != q.device:
        raise ValueError(f"bank_keys is on {bank_keys.device} but q is on {q.device}")


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
                       inv_tau: float, tile: int) -> torch.Tensor:
    """Streaming log-sum-exp over ``[pos, q @ bank.T] * inv_tau`` (pos: (B,) logits or None).

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
        m_new = torch.maximum(m, logits.amax(dim=1))
        s = s * torch.exp(m - m_new) + logits.sub_(m_new[:, None]).exp_().sum(dim=1)
        m = m_new
    # s == 0 only for an empty set (m == -inf): log(0) = -inf, and -inf + -inf = -inf.
    return torch.where(s > 0, m + torch.log(s), torch.full_like(m, float("-inf")))


def _lse_backward_torch(q: torch.Tensor, bank: torch.Tensor, lse: torch.Tensor,
                        inv_tau: float, tile: int) -> torch.Tensor:
    """``sum_j softmax_j * bank_j`` (softmax normalised by ``lse``), streamed over tiles: (B, d)."""
    acc = torch.zeros_like(q)
    if bank.shape[0] == 0:
        return acc
    q_s = q * inv_tau
    for start in range(0, bank.shape[0], tile):
        kt = bank[start:start + tile].to(q.dtype)
        p = (q_s @ kt.T).sub_(lse[:, None]).exp_()  # (B, tile) softmax probabilities
        acc.addmm_(p, kt)
    return acc


def _differentiable_dq(q, kp, bank, inv_tau, g):
    """dq = g * softmax @ [k+; bank] / tau with autograd ops, for create_graph=True (second
    derivatives, e.g. gradgradcheck). Materialises the B x K logits: not the training path."""
    acc = _acc_dtype(q.dtype)
    qa, bank = q.to(acc), bank.to(acc)
    if kp is None and bank.shape[0] == 0:
        return torch.zeros_like(q)
    logits = qa @ bank.T * inv_tau
    if kp is not None:  # the positive is per sample: column 0
        logits = torch.cat([(qa * kp).sum(dim=1, keepdim=True) * inv_tau, logits], dim=1)
    p = torch.softmax(logits, dim=1)
    mix = p @ bank if kp is None else p[:, 1:] @ bank + p[:, :1] * kp
    return (mix * (g.to(acc) * inv_tau)[:, None]).to(q.dtype)


class _StreamingLSE(torch.autograd.Function):
    """lse_i = logsumexp([q_i.k+_i (optional), q_i @ bank.T] / tau); grad w.r.t. q only."""

    @staticmethod
    def forward(ctx, q, k_pos, bank, tau, impl, tile, splits):
        acc = _acc_dtype(q.dtype)
        inv_tau = 1.0 / float(tau)
        q_acc = q.detach().to(acc)
        bank = bank.detach()
        kp = None if k_pos is None else k_pos.detach().to(acc)
        if impl == "triton":  # the kernel reads q in its own dtype and accumulates in `acc`
            from .bank_nce_triton import lse_forward_triton

            q_acc = q.detach()
            lse = lse_forward_triton(q_acc, bank, kp, inv_tau, splits=splits)
        else:
            pos = None if kp is None else (q_acc * kp).sum(dim=1)
            lse = _lse_forward_torch(q_acc, bank, pos, inv_tau, tile)
        ctx.save_for_backward(q_acc, kp if kp is not None else lse.new_empty(0), bank, lse, q)
        ctx.has_pos, ctx.inv_tau, ctx.impl, ctx.tile, ctx.splits = kp is not None, inv_tau, impl, tile, splits
        ctx.q_dtype = q.dtype
        return lse

    @staticmethod
    @no_autocast
    def backward(ctx, g):
        q_acc, kp, bank, lse, q = ctx.saved_tensors
        kp = kp if ctx.has_pos else None
        if torch.is_grad_enabled():  # create_graph=True: differentiable (double backward) path
            return _differentiable_dq(q, kp, bank, ctx.inv_tau, g), None, None, None, None, None, None
        g = g.to(lse.dtype)
        if ctx.impl == "triton":
            from .bank_nce_triton import lse_backward_triton

            dq = lse_backward_triton(q_acc, bank, kp, lse, g, ctx.inv_tau, splits=ctx.splits)
        else:
            acc = _lse_backward_torch(q_acc, bank, lse, ctx.inv_tau, ctx.tile)
            if kp is not None:
                p_pos = torch.exp((q_acc * kp).sum(dim=1) * ctx.inv_tau - lse)
                acc = acc + p_pos[:, None] * kp
            # An empty set (lse = -inf) has no gradient; keep it 0, not nan.
            scale = torch.where(torch.isfinite(lse), g, torch.zeros_like(g)) * ctx.inv_tau
            dq = acc * scale[:, None]
        return dq.to(ctx.q_dtype), None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API
@no_autocast
def bank_lse(q: torch.Tensor, bank_keys: torch.Tensor, tau: float, impl: str | None = None,
             *, tile: int = TILE, splits: int | None = None) -> torch.Tensor:
    """Partial log-sum-exp of ``q @ bank_keys.T / tau`` over one bank shard.

    q: (B, d); bank_keys: (K, d), K may be 0 (returns -inf). Returns (B,) in float32
    (float64 for float64 inputs). Differentiable w.r.t. ``q`` (d lse / dq = softmax @ bank / tau);
    the bank gets no gradient. A distributed bank combines shards with
    ``torch.logsumexp(torch.stack(partials), 0)`` (after an all-gather of the (B,) partials).
    """
    _check(q, bank_keys)
    impl = _resolve(impl, q)
    if impl == "reference":
        acc = _acc_dtype(q.dtype)
        logits = (q.to(acc) @ bank_keys.detach().to(acc).T) / tau
        return torch.logsumexp(logits, dim=1)
    return _StreamingLSE.apply(q, None, bank_keys, float(tau), impl, int(tile), splits)


@no_autocast
def bank_nce(q: torch.Tensor, k_pos: torch.Tensor, bank_keys: torch.Tensor, tau: float,
             impl: str | None = None, *, tile: int = TILE, splits: int | None = None) -> torch.Tensor:
    """Per-sample InfoNCE loss against one positive and a bank of negatives.

    q: (B, d) queries; k_pos: (B, d) positive keys; bank_keys: (K, d) negatives (K may be 0,
    then the loss is 0). Returns (B,) ``-q.k+/tau + logsumexp([q.k+, q @ bank.T] / tau)``
    in float32 (float64 for float64 inputs); take ``.mean()`` for the batch loss.
    Differentiable w.r.t. ``q`` only: dq = (sum_j softmax_j k_j - k+) / tau.
    ``tile`` (bank rows per step, "torch") and ``splits`` (bank ranges run in parallel,
    "triton"; default fills the GPU) only change speed and memory, not the result.
    """
    _check(q, bank_keys, k_pos)
    impl = _resolve(impl, q)
    acc = _acc_dtype(q.dtype)
    inv_tau = 1.0 / float(tau)
    kp = k_pos.detach().to(acc)
    pos = (q.to(acc) * kp).sum(dim=1) * inv_tau  # (B,), differentiable w.r.t. q
    if impl == "reference":
        logits = torch.cat([pos[:, None], (q.to(acc) @ bank_keys.detach().to(acc).T) * inv_tau], dim=1)
        return torch.logsumexp(logits, dim=1) - pos
    lse = _StreamingLSE.apply(q, kp, bank_keys, float(tau), impl, int(tile), splits)
    return lse - pos
