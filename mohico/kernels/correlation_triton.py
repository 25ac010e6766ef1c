"""Fused MotionSqueeze correlation + Gaussian-masked soft-argmax + confidence, in Triton.

Math and notation: ``correlation.py``. One program owns BLOCK_P pixels of one image and all C
channels; it loops over the (2r+1)^2 displacements, loading the shifted f2 tile each time
(neighbouring programs share those reads through L1/L2). The correlation volume
(B, (2r+1)^2, H, W) never exists in memory: only five (B, H, W) per-pixel statistics are
stored for backward (dx, dy, conf, argmax index, softmax denominator).

- forward: pass 1 finds the max / first argmax of relu(s); pass 2 accumulates the softmax of
  temperature * g * s (its max is temperature * conf, so no online rescaling is needed).
- backward ``df1``: per pixel x, recompute s(x, p) for every p and accumulate dL/ds * f2(x + p).
- backward ``df2``: per pixel y, gather over the pixels x = y - p that looked at it and
  accumulate dL/ds(x, p) * f1(x) (no atomics: deterministic).

Inputs are float32 or float64 (the wrapper casts half inputs to float32). On CPU the kernels
run under ``TRITON_INTERPRET=1`` set before this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bank_nce_triton import launch_env

INTERPRETED = bool(triton.knobs.runtime.interpret)
MAX_C = 512  # all channels of a pixel block are held in registers


@triton.jit
def corr_fwd_kernel(F1, F2, DX, DY, CONF, IDX, DENOM, C, H, W, sigma_sq2_inv, temperature,
                    R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    HW = H * W
    pix = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    cc = tl.arange(0, BLOCK_C)
    mask_p = pix < HW
    mask_c = cc < C
    y = pix // W
    x = pix % W
    base = b * C * HW
    f1 = tl.load(F1 + base + cc[:, None] * HW + pix[None, :], mask=mask_c[:, None] & mask_p[None, :], other=0.0)
    KS: tl.constexpr = 2 * R + 1
    best = tl.full((BLOCK_P,), -1.0, f1.dtype)  # relu(s) >= 0 > -1
    idx = tl.zeros((BLOCK_P,), tl.int32)
    for i in range(KS * KS):
        yy = y + (i // KS - R)
        xx = x + (i % KS - R)
        ok = mask_p & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        f2 = tl.load(F2 + base + cc[:, None] * HW + (yy * W + xx)[None, :],
                     mask=mask_c[:, None] & ok[None, :], other=0.0)
        s = tl.maximum(tl.sum(f1 * f2, axis=0), 0.0)
        better = s > best  # strict: the first maximum wins, as torch.max
        best = tl.where(better, s, best)
        idx = tl.where(better, i, idx)
    ax = (idx % KS - R).to(f1.dtype)
    ay = (idx // KS - R).to(f1.dtype)
    m = temperature * best
    denom = tl.zeros((BLOCK_P,), f1.dtype)
    sx = tl.zeros((BLOCK_P,), f1.dtype)
    sy = tl.zeros((BLOCK_P,), f1.dtype)
    for i in range(KS * KS):
        py = i // KS - R
        px = i % KS - R
        yy = y + py
        xx = x + px
        ok = mask_p & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        f2 = tl.load(F2 + base + cc[:, None] * HW + (yy * W + xx)[None, :],
                     mask=mask_c[:, None] & ok[None, :], other=0.0)
        s = tl.maximum(tl.sum(f1 * f2, axis=0), 0.0)
        dpx = px - ax
        dpy = py - ay
        gauss = tl.exp(-(dpx * dpx + dpy * dpy) * sigma_sq2_inv)
        e = tl.exp(temperature * gauss * s - m)
        denom += e
        sx += e * px
        sy += e * py
    out = b * HW + pix
    tl.store(DX + out, sx / denom / R, mask=mask_p)
    tl.store(DY + out, sy / denom / R, mask=mask_p)
    tl.store(CONF + out, best, mask=mask_p)
    tl.store(IDX + out, idx, mask=mask_p)
    tl.store(DENOM + out, denom, mask=mask_p)


@triton.jit
def _ds(i, raw, idx, conf, denom, dx, dy, gdx, gdy, gconf, sigma_sq2_inv, temperature,
        R: tl.constexpr):
    """dL/ds for displacement i at pixels with saved statistics (see correlation.backward_torch)."""
    KS: tl.constexpr = 2 * R + 1
    py = tl.zeros_like(raw) + (i // KS - R)  # in the data's float dtype
    px = tl.zeros_like(raw) + (i % KS - R)
    s = tl.maximum(raw, 0.0)
    dpx = px - (idx % KS - R).to(raw.dtype)
    dpy = py - (idx // KS - R).to(raw.dtype)
    gauss = tl.exp(-(dpx * dpx + dpy * dpy) * sigma_sq2_inv)
    w = tl.exp(temperature * gauss * s - temperature * conf) / denom
    dz = w * (gdx * (px / R - dx) + gdy * (py / R - dy))
    ds = dz * temperature * gauss + tl.where(idx == i, gconf, 0.0)
    return tl.where(raw > 0, ds, 0.0)


@triton.jit
def corr_bwd_f1_kernel(F1, F2, DX, DY, CONF, IDX, DENOM, GOUT, DF1, C, H, W, sigma_sq2_inv,
                       temperature, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    HW = H * W
    pix = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    cc = tl.arange(0, BLOCK_C)
    mask_p = pix < HW
    mask_c = cc < C
    y = pix // W
    x = pix % W
    base = b * C * HW
    mask_cp = mask_c[:, None] & mask_p[None, :]
    f1 = tl.load(F1 + base + cc[:, None] * HW + pix[None, :], mask=mask_cp, other=0.0)
    st = b * HW + pix
    dx = tl.load(DX + st, mask=mask_p, other=0.0)
    dy = tl.load(DY + st, mask=mask_p, other=0.0)
    conf = tl.load(CONF + st, mask=mask_p, other=0.0)
    idx = tl.load(IDX + st, mask=mask_p, other=0)
    denom = tl.load(DENOM + st, mask=mask_p, other=1.0)
    gdx = tl.load(GOUT + b * 3 * HW + pix, mask=mask_p, other=0.0)
    gdy = tl.load(GOUT + b * 3 * HW + HW + pix, mask=mask_p, other=0.0)
    gconf = tl.load(GOUT + b * 3 * HW + 2 * HW + pix, mask=mask_p, other=0.0)
    KS: tl.constexpr = 2 * R + 1
    acc = tl.zeros((BLOCK_C, BLOCK_P), f1.dtype)
    for i in range(KS * KS):
        yy = y + (i // KS - R)
        xx = x + (i % KS - R)
        ok = mask_p & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        f2 = tl.load(F2 + base + cc[:, None] * HW + (yy * W + xx)[None, :],
                     mask=mask_c[:, None] & ok[None, :], other=0.0)
        raw = tl.sum(f1 * f2, axis=0)
        ds = _ds(i, raw, idx, conf, denom, dx, dy, gdx, gdy, gconf, sigma_sq2_inv, temperature, R)
        acc += ds[None, :] * f2
    tl.store(DF1 + base + cc[:, None] * HW + pix[None, :], acc, mask=mask_cp)


@triton.jit
def corr_bwd_f2_kernel(F1, F2, DX, DY, CONF, IDX, DENOM, GOUT, DF2, C, H, W, sigma_sq2_inv,
                       temperature, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    HW = H * W
    pix = pid * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels y of f2
    cc = tl.arange(0, BLOCK_C)
    mask_p = pix < HW
    mask_c = cc < C
    y = pix // W
    x = pix % W
    base = b * C * HW
    mask_cp = mask_c[:, None] & mask_p[None, :]
    f2 = tl.load(F2 + base + cc[:, None] * HW + pix[None, :], mask=mask_cp, other=0.0)
    KS: tl.constexpr = 2 * R + 1
    acc = tl.zeros((BLOCK_C, BLOCK_P), f2.dtype)
    for i in range(KS * KS):
        ys = y - (i // KS - R)  # the pixel that looked at y through displacement i
        xs = x - (i % KS - R)
        ok = mask_p & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        src = ys * W + xs
        f1 = tl.load(F1 + base + cc[:, None] * HW + src[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
        st = b * HW + src
        dx = tl.load(DX + st, mask=ok, other=0.0)
        dy = tl.load(DY + st, mask=ok, other=0.0)
        conf = tl.load(CONF + st, mask=ok, other=0.0)
        idx = tl.load(IDX + st, mask=ok, other=-1)
        denom = tl.load(DENOM + st, mask=ok, other=1.0)
        gdx = tl.load(GOUT + b * 3 * HW + src, mask=ok, other=0.0)
        gdy = tl.load(GOUT + b * 3 * HW + HW + src, mask=ok, other=0.0)
        gconf = tl.load(GOUT + b * 3 * HW + 2 * HW + src, mask=ok, other=0.0)
        raw = tl.sum(f1 * f2, axis=0)
        ds = _ds(i, raw, idx, conf, denom, dx, dy, gdx, gdy, gconf, sigma_sq2_inv, temperature, R)
        ds = tl.where(ok, ds, 0.0)
        acc += ds[None, :] * f1
    tl.store(DF2 + base + cc[:, None] * HW + pix[None, :], acc, mask=mask_cp)


def launch_cfg(f1: torch.Tensor, radius: int):
    """The launch of the three kernels for ``f1: (B, C, H, W)``: ``(B, C, H, W, BLOCK_C, BLOCK_P,
    num_warps, grid)``; raises on shapes or dtypes the kernels do not take."""
    B, C, H, W = f1.shape
    if C > MAX_C:
        raise ValueError(f"triton correlation holds all channels in registers: C={C} > {MAX_C}; "
                         "reduce channels first (MotionSqueeze uses a 1x1 conv to 64) or use impl='torch'")
    if f1.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton correlation takes float32/float64, got {f1.dtype}")
    if B * C * H * W >= 2 ** 31:
        raise ValueError(f"triton correlation uses int32 offsets: B*C*H*W = {B * C * H * W} >= 2**31; "
                         "call it on smaller batches")
    block_c = max(2, triton.next_power_of_2(C))
    # 8 pixels x all channels per program, one warp. Measured on an H200, N = 128, 28 x 28, r = 7
    # (benchmarks/correlation_launch.py; table in benchmarks/RESULTS.md): forward + backward took
    # 16.5 / 11.0 / 28.5 ms at C = 64 / 32 / 128, against 126 ms for the former 64 pixels x 4 warps
    # at C = 64. It was the fastest launch at C = 64 and 128, and 25% slower than the fastest (8 pixels
    # x 2 warps) at C = 32; wider blocks were slower at every C measured.
    block_p = max(8, min(128, 256 // block_c))
    num_warps = 1
    return B, C, H, W, block_c, block_p, num_warps, (B, triton.cdiv(H * W, block_p))


def correlation_forward_triton(f1, f2, radius, sigma, temperature, out=None):
    """Returns (dx, dy, conf, idx, denom), each (B, H, W); ``out`` may pass those buffers."""
    f1, f2 = f1.contiguous(), f2.contiguous()
    B, C, H, W, block_c, block_p, num_warps, grid = launch_cfg(f1, radius)
    if out is None:
        dx, dy, conf, denom = (torch.empty((B, H, W), dtype=f1.dtype, device=f1.device) for _ in range(4))
        idx = torch.empty((B, H, W), dtype=torch.int32, device=f1.device)
    else:
        dx, dy, conf, idx, denom = out
    if B * H * W:
        with launch_env(INTERPRETED):
            corr_fwd_kernel[grid](f1, f2, dx, dy, conf, idx, denom, C, H, W,
                                   1.0 / (2.0 * sigma * sigma), float(temperature),
                                   R=int(radius), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return dx, dy, conf, idx, denom


def correlation_backward_triton(f1, f2, dx, dy, conf, idx, denom, gout, radius, sigma, temperature,
                                out=None):
    """Returns (df1, df2), each (B, C, H, W); ``out`` may pass those buffers."""
    B, C, H, W, block_c, block_p, num_warps, grid = launch_cfg(f1, radius)
    df1, df2 = out if out is not None else (torch.empty_like(f1), torch.empty_like(f2))
    gout = gout.to(f1.dtype).contiguous()
    if B * H * W:
        args = (f1, f2, dx, dy, conf, idx.to(torch.int32), denom, gout)
        scal = (C, H, W, 1.0 / (2.0 * sigma * sigma), float(temperature))
        with launch_env(INTERPRETED):
            launch = dict(R=int(radius), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
            corr_bwd_f1_kernel[grid](*args, df1, *scal, **launch)
            corr_bwd_f2_kernel[grid](*args, df2, *scal, **launch)
    return df1, df2
