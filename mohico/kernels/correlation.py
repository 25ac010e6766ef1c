"""MotionSqueeze local correlation + Gaussian-masked soft-argmax + max confidence (docs/METHODS.md §3).

For features ``f1, f2: (B, C, H, W)`` that the caller has already L2-normalised over C
(``F.normalize(f, dim=1)``), and displacements ``p = (px, py)`` with ``|px|, |py| <= r``::

    s(x, p)  = relu(f1(x) . f2(x + p))            (zero padding outside the frame; ReLU as in
                                                  the official code)
    a(x)     = argmax_p s(x, p)                    (first maximum in row-major (py, px) order)
    g(x, p)  = exp(-|p - a(x)|^2 / (2 sigma^2))    (sigma in displacement units)
    w(x, .)  = softmax_p(temperature * g(x, p) * s(x, p))
    dx, dy   = sum_p w(x, p) * (px, py) / r        (in [-1, 1])
    conf     = max_p s(x, p)

Output ``(B, 3, H, W)`` with channels ``(dx, dy, conf)``. The temperature multiplies the
correlation (the official value 100 sharpens a correlation in [0, 1]). Gradients flow to f1
and f2 through the soft-argmax and the confidence; the argmax location is piecewise constant.

Implementations (``impl=``): ``None`` dispatches (Triton on CUDA, ``"torch"`` elsewhere);
``"reference"`` materialises the (B, (2r+1)^2, H, W) volume with an unfold/matmul formulation
(test oracle, autograd); ``"torch"`` is a custom autograd Function that loops over the
(2r+1)^2 displacements, keeping only O(B*H*W) running statistics (forward and backward
recompute the correlation; never the whole volume); ``"triton"`` is the fused kernel in
``correlation_triton.py``. Second derivatives (``create_graph=True``) of "torch"/"triton" are
exact but recompute through the reference formulation (they materialise the volume).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bank_nce import KernelUnavailableError, no_autocast, triton_usable

IMPLS = (None, "torch", "reference", "triton")


def _check(f1: torch.Tensor, f2: torch.Tensor, radius: int) -> None:
    if f1.dim() != 4 or f1.shape != f2.shape:
        raise ValueError(f"f1 and f2 must both be (B, C, H, W) of one shape, got "
                         f"{tuple(f1.shape)} and {tuple(f2.shape)}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")


def _resolve(impl: str | None, t: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl is None:
        return "triton" if (t.is_cuda and triton_usable(t, "correlation_triton")) else "torch"
    if impl == "triton" and not triton_usable(t, "correlation_triton"):
        raise KernelUnavailableError(
            f"impl='triton' needs CUDA tensors (got {t.device}), or TRITON_INTERPRET=1 set before "
            "mohico.kernels.correlation_triton is first imported (CPU interpreter); use "
            "impl='torch' or impl=None (auto) instead")
    return impl


def _offsets(radius: int, device, dtype):
    """Displacements of the window in row-major (py, px) order: px, py of shape (P,)."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    py, px = torch.meshgrid(r, r, indexing="ij")
    return px.reshape(-1), py.reshape(-1)


# ----------------------------------------------------------------------------- reference
def _reference(f1, f2, radius, sigma, temperature):
    B, C, H, W = f1.shape
    k = 2 * radius + 1
    # (B, C*k*k, H*W): channel-major, then (py, px) row-major -- the matmul formulation.
    patches = F.unfold(f2, kernel_size=k, padding=radius).view(B, C, k * k, H * W)
    corr = torch.einsum("bcx,bcpx->bpx", f1.reshape(B, C, H * W), patches).relu()  # (B, P, HW)
    px, py = _offsets(radius, f1.device, f1.dtype)
    conf, idx = corr.max(dim=1)  # first maximum
    ax, ay = px[idx], py[idx]  # (B, HW)
    g = torch.exp(-((px[None, :, None] - ax[:, None]) ** 2 + (py[None, :, None] - ay[:, None]) ** 2)
                  / (2.0 * sigma ** 2))
    w = torch.softmax(temperature * g * corr, dim=1)
    dx = (w * px[None, :, None]).sum(1) / radius
    dy = (w * py[None, :, None]).sum(1) / radius
    return torch.stack([dx, dy, conf], dim=1).view(B, 3, H, W)


# ----------------------------------------------------------------------------- streaming torch
def _shifted(f2p: torch.Tensor, iy: int, ix: int, H: int, W: int) -> torch.Tensor:
    return f2p[:, :, iy:iy + H, ix:ix + W]


def stats_torch(f1, f2, radius, sigma, temperature):
    """The streaming PyTorch forward: two passes over the window, max/argmax, then the
    Gaussian-masked softmax. ``f1, f2: (B, C, H, W)`` -> ``(dx, dy, conf, idx, denom)``, each
    ``(B, H, W)`` (``idx`` int64: the argmax displacement, row-major in the ``2r+1`` window)."""
    B, C, H, W = f1.shape
    k = 2 * radius + 1
    f2p = F.pad(f2, (radius, radius, radius, radius))
    conf = torch.full((B, H, W), -1.0, dtype=f1.dtype, device=f1.device)  # relu >= 0 > -1
    idx = torch.zeros((B, H, W), dtype=torch.long, device=f1.device)
    for i in range(k * k):
        s = (f1 * _shifted(f2p, i // k, i % k, H, W)).sum(1).relu()
        better = s > conf  # strict: keeps the first maximum
        conf = torch.where(better, s, conf)
        idx = torch.where(better, torch.full_like(idx, i), idx)
    ax = (idx % k - radius).to(f1.dtype)
    ay = (idx // k - radius).to(f1.dtype)
    # max_p temperature*g*s == temperature*conf (g <= 1 and g = 1 at the argmax): no online rescale.
    m = temperature * conf
    denom = torch.zeros_like(conf)
    sx = torch.zeros_like(conf)
    sy = torch.zeros_like(conf)
    inv2s2 = 1.0 / (2.0 * sigma ** 2)
    for i in range(k * k):
        py, px = i // k - radius, i % k - radius
        s = (f1 * _shifted(f2p, i // k, i % k, H, W)).sum(1).relu()
        g = torch.exp(-((px - ax) ** 2 + (py - ay) ** 2) * inv2s2)
        e = torch.exp(temperature * g * s - m)
        denom += e
        sx += e * px
        sy += e * py
    dx = sx / denom / radius
    dy = sy / denom / radius
    return dx, dy, conf, idx, denom


class _CorrelationSoftArgmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f1_in, f2_in, radius, sigma, temperature, impl):
        f1, f2 = f1_in.detach().contiguous(), f2_in.detach().contiguous()
        if impl == "triton":
            from .correlation_triton import correlation_forward_triton

            dx, dy, conf, idx, denom = correlation_forward_triton(f1, f2, radius, sigma, temperature)
        else:
            dx, dy, conf, idx, denom = stats_torch(f1, f2, radius, sigma, temperature)
        ctx.save_for_backward(f1, f2, dx, dy, conf, idx, denom, f1_in, f2_in)
        ctx.args = (radius, sigma, temperature, impl)
        return torch.stack([dx, dy, conf], dim=1)

    @staticmethod
    @no_autocast
    def backward(ctx, gout):
        f1, f2, dx, dy, conf, idx, denom, f1_in, f2_in = ctx.saved_tensors
        radius, sigma, temperature, impl = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation (volume!)
            need = [t for t in (f1_in, f2_in) if t.requires_grad]
            out = _reference(f1_in, f2_in, radius, sigma, temperature)
            grads = iter(torch.autograd.grad(out, need, gout, create_graph=True)) if need else iter(())
            return (next(grads) if f1_in.requires_grad else None, next(grads) if f2_in.requires_grad else None,
                    None, None, None, None)
        gout = gout.contiguous()
        if impl == "triton":
            from .correlation_triton import correlation_backward_triton

            df1, df2 = correlation_backward_triton(f1, f2, dx, dy, conf, idx, denom, gout,
                                                   radius, sigma, temperature)
        else:
            df1, df2 = backward_torch(f1, f2, dx, dy, conf, idx, denom, gout, radius, sigma, temperature)
        return df1, df2, None, None, None, None


def backward_torch(f1, f2, dx, dy, conf, idx, denom, gout, radius, sigma, temperature):
    """The streaming PyTorch backward from :func:`stats_torch`'s statistics and ``gout: (B, 3, H, W)``
    -> ``(df1, df2)`` shaped like ``f1, f2``. dL/ds(x,p) = T g s'(p) w (gdx (px/r - dx) + gdy (py/r - dy)) + gconf [p = argmax] [s > 0]."""
    B, C, H, W = f1.shape
    k = 2 * radius + 1
    gdx, gdy, gconf = gout[:, 0], gout[:, 1], gout[:, 2]
    f2p = F.pad(f2, (radius, radius, radius, radius))
    df1 = torch.zeros_like(f1)
    df2p = torch.zeros_like(f2p)
    ax = (idx % k - radius).to(f1.dtype)
    ay = (idx // k - radius).to(f1.dtype)
    m = temperature * conf
    inv2s2 = 1.0 / (2.0 * sigma ** 2)
    for i in range(k * k):
        py, px = i // k - radius, i % k - radius
        f2s = _shifted(f2p, i // k, i % k, H, W)
        raw = (f1 * f2s).sum(1)
        s = raw.relu()
        g = torch.exp(-((px - ax) ** 2 + (py - ay) ** 2) * inv2s2)
        w = torch.exp(temperature * g * s - m) / denom
        dz = w * (gdx * (px / radius - dx) + gdy * (py / radius - dy))
        ds = dz * temperature * g + torch.where(idx == i, gconf, torch.zeros_like(gconf))
        ds = torch.where(raw > 0, ds, torch.zeros_like(ds))  # ReLU
        df1 += ds[:, None] * f2s
        df2p[:, :, i // k:i // k + H, i % k:i % k + W] += ds[:, None] * f1
    return df1, df2p[:, :, radius:radius + H, radius:radius + W].contiguous()


@no_autocast
def local_correlation_softargmax(f1: torch.Tensor, f2: torch.Tensor, radius: int = 7,
                                 sigma: float = 5.0, temperature: float = 100.0,
                                 impl: str | None = None) -> torch.Tensor:
    """Soft-argmax displacement and confidence from f1 to f2.

    f1, f2: (B, C, H, W), L2-normalised over C by the caller. Returns (B, 3, H, W):
    (dx, dy) expected displacement / radius in [-1, 1], and conf = max correlation in [0, 1].
    Computed in float32 for half inputs (returned in the input dtype), float64 for float64.
    """
    _check(f1, f2, radius)
    impl = _resolve(impl, f1)
    dtype = f1.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = f1.to(acc), f2.to(acc)
    if impl == "reference":
        out = _reference(a, b, radius, float(sigma), float(temperature))
    else:
        out = _CorrelationSoftArgmax.apply(a, b, int(radius), float(sigma), float(temperature), impl)
    return out.to(dtype)
