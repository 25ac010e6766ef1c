"""MotionSqueeze correlation soft-argmax: reference, streaming torch and Triton (CPU interpreter)
against a brute-force float64 numpy loop, gradcheck, and a known-shift ground truth.

Data are fresh on every run (seeds are printed in assertion messages).
"""
from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mohico.kernels import correlation_triton as ct  # built interpreted (TRITON_INTERPRET=1 from conftest.py)
from mohico.kernels import local_correlation_softargmax as corr

IMPLS = ["reference", "torch", "triton"]


def _feats(B, C, H, W, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f1 = F.normalize(torch.randn(B, C, H, W, generator=g, dtype=torch.float64), dim=1)
    f2 = F.normalize(torch.randn(B, C, H, W, generator=g, dtype=torch.float64), dim=1)
    return f1.to(dtype), f2.to(dtype)


def _np_brute(f1, f2, r, sigma, temperature):
    """Pixel by pixel, displacement by displacement, in float64."""
    f1, f2 = f1.detach().double().numpy(), f2.detach().double().numpy()
    B, C, H, W = f1.shape
    offs = [(py, px) for py in range(-r, r + 1) for px in range(-r, r + 1)]
    pys = np.array([o[0] for o in offs], np.float64)
    pxs = np.array([o[1] for o in offs], np.float64)
    out = np.zeros((B, 3, H, W))
    for b in range(B):
        for y in range(H):
            for x in range(W):
                s = np.zeros(len(offs))
                for j, (py, px) in enumerate(offs):
                    if 0 <= y + py < H and 0 <= x + px < W:
                        s[j] = max(0.0, float(f1[b, :, y, x] @ f2[b, :, y + py, x + px]))
                a = int(np.argmax(s))  # first maximum
                gauss = np.exp(-((pxs - pxs[a]) ** 2 + (pys - pys[a]) ** 2) / (2 * sigma ** 2))
                z = temperature * gauss * s
                w = np.exp(z - z.max())
                w /= w.sum()
                out[b, :, y, x] = (w @ pxs / r, w @ pys / r, s[a])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,C,H,W,r,sigma,temp", [(2, 5, 7, 9, 2, 1.5, 10.0), (1, 6, 11, 10, 7, 5.0, 100.0)])
def test_matches_bruteforce_numpy(impl, B, C, H, W, r, sigma, temp):
    seed = secrets.randbits(31)
    f1, f2 = _feats(B, C, H, W, seed)
    out = corr(f1, f2, radius=r, sigma=sigma, temperature=temp, impl=impl)
    assert out.shape == (B, 3, H, W) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), _np_brute(f1, f2, r, sigma, temp), rtol=1e-9, atol=1e-11,
                               err_msg=f"seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradients_match_reference_autograd(impl):
    seed = secrets.randbits(31)
    f1, f2 = _feats(2, 6, 8, 7, seed)
    w = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    grads = []
    for im in ("reference", impl):
        a, b = f1.clone().requires_grad_(), f2.clone().requires_grad_()
        grads.append(torch.autograd.grad((corr(a, b, radius=3, sigma=2.0, temperature=20.0, impl=im) * w).sum(), (a, b)))
    for g_ref, g in zip(*grads):
        assert torch.isfinite(g).all()
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-9, atol=1e-11, err_msg=f"seed={seed}")


def _separated(f1, f2, r, margin=1e-3):
    """Finite differences are valid: no near-ties at the argmax and no correlation near the ReLU kink."""
    B, C, H, W = f1.shape
    k = 2 * r + 1
    vol = torch.einsum("bcx,bcpx->bpx", f1.reshape(B, C, -1),
                       F.unfold(f2, k, padding=r).view(B, C, k * k, -1))
    pad = F.unfold(torch.ones_like(f2[:, :1]), k, padding=r).view(B, k * k, -1) > 0
    top2 = vol.relu().topk(2, dim=1).values
    return bool((top2[:, 0] - top2[:, 1] > margin).all() and (vol[pad].abs() > margin).all())


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradcheck(impl):
    while True:  # fresh data, redrawn until finite differences are meaningful
        seed = secrets.randbits(31)
        f1, f2 = _feats(1, 3, 4, 5, seed)
        if _separated(f1, f2, 2):
            break
    fn = lambda a, b: corr(a, b, radius=2, sigma=1.5, temperature=5.0, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f1.requires_grad_(), f2.requires_grad_()),
                                    fast_mode=impl == "triton"), f"seed={seed}"


def _shift(f, dx, dy):
    """g(y, x) = f(y - dy, x - dx): the content moves by (dx, dy); zeros where nothing came in."""
    g = torch.zeros_like(f)
    H, W = f.shape[-2:]
    g[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        f[..., max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return g


@pytest.mark.parametrize("impl,r,size,shift", [("reference", 7, 26, (3, -5)), ("torch", 7, 26, (-6, 2)),
                                               ("triton", 3, 14, (2, -1))])
@pytest.mark.slow
def test_known_shift_is_recovered_with_high_confidence(impl, r, size, shift):
    seed = secrets.randbits(31)
    g = torch.Generator().manual_seed(seed)
    C, H, W = 32, size, size
    tex = F.normalize(torch.randn(1, C, H, W, generator=g, dtype=torch.float64), dim=1)
    f1 = tex
    f2 = _shift(tex, *shift)
    # Right half of f2: unrelated noise (no match anywhere) -> low confidence there.
    noise = F.normalize(torch.randn(1, C, H, W, generator=g, dtype=torch.float64), dim=1)
    f2[..., W // 2:] = noise[..., W // 2:]
    out = corr(f1, f2, radius=r, sigma=5.0, temperature=100.0, impl=impl)
    b = r  # pixels whose whole window and match lie inside the matched left half
    inner = out[0, :, b:H - b, b:W // 2 - max(shift[0], 0)]  # match x + shift in the left half
    assert inner[0].numel() >= 2 * (H - 2 * b)
    dx, dy = shift[0] / r, shift[1] / r
    np.testing.assert_allclose(inner[0].numpy(), dx, atol=1e-3, err_msg=f"seed={seed}")
    np.testing.assert_allclose(inner[1].numpy(), dy, atol=1e-3, err_msg=f"seed={seed}")
    np.testing.assert_allclose(inner[2].numpy(), 1.0, atol=1e-9, err_msg=f"seed={seed}")
    unmatched = out[0, 2, :, W // 2 + r:]  # whole window inside the noise half
    assert unmatched.numel() > 0 and unmatched.max() < 0.9 and inner[2].min() > unmatched.max() + 0.1


@pytest.mark.slow
def test_triton_writes_every_output_element():
    seed = secrets.randbits(31)
    f1, f2 = _feats(2, 5, 9, 7, seed)
    B, H, W = 2, 9, 7
    nan = lambda *s, dt=torch.float64: torch.full(s, float("nan"), dtype=dt)  # noqa: E731
    bufs = (nan(B, H, W), nan(B, H, W), nan(B, H, W), torch.full((B, H, W), -7, dtype=torch.int32), nan(B, H, W))
    ct.correlation_forward_triton(f1, f2, 2, 1.5, 10.0, out=bufs)
    assert all(torch.isfinite(t.double()).all() for t in bufs) and (bufs[3] >= 0).all()
    ref = _np_brute(f1, f2, 2, 1.5, 10.0)
    np.testing.assert_allclose(torch.stack([bufs[0], bufs[1], bufs[2]], 1).numpy(), ref, rtol=1e-9, atol=1e-11)
    grads = (nan(B, 5, H, W), nan(B, 5, H, W))
    ct.correlation_backward_triton(f1, f2, *bufs, torch.randn(B, 3, H, W, dtype=torch.float64), 2, 1.5, 10.0,
                                   out=grads)
    assert all(torch.isfinite(t).all() for t in grads), f"seed={seed}"


def test_streaming_torch_never_materialises_the_volume():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        max_numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.max_numel = max(self.max_numel, t.numel())
            return out

    B, C, H, W, r = 2, 4, 12, 12, 7
    volume = B * (2 * r + 1) ** 2 * H * W
    for impl, bounded in (("torch", True), ("reference", False)):
        f1, f2 = _feats(B, C, H, W, secrets.randbits(31))
        f1.requires_grad_(), f2.requires_grad_()
        with MaxNumel() as mode:
            corr(f1, f2, radius=r, impl=impl).sum().backward()
        if bounded:  # the padded f2 is the largest tensor: O(B C (H + 2r)(W + 2r)) < the volume
            assert mode.max_numel <= B * C * (H + 2 * r) * (W + 2 * r) < volume, mode.max_numel
        else:
            assert mode.max_numel >= volume


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    f1, f2 = _feats(1, 8, 10, 9, secrets.randbits(31), dtype)
    out = corr(f1, f2, radius=3)
    assert out.dtype == dtype
    ref = corr(f1.double(), f2.double(), radius=3, impl="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), atol=tol)


def test_bad_inputs_raise():
    f1, f2 = _feats(1, 4, 5, 5, 0)
    with pytest.raises(ValueError, match="one shape"):
        corr(f1, f2[..., :4])
    with pytest.raises(ValueError, match="radius"):
        corr(f1, f2, radius=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        corr(f1, f2, impl="cuda")



@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_second_derivatives_are_exact(impl):
    """create_graph=True recomputes through the reference: equal to its double backward."""
    while True:
        seed = secrets.randbits(31)
        f1, f2 = _feats(1, 3, 4, 4, seed)
        if _separated(f1, f2, 1):
            break
    f1.requires_grad_()
    hv = []
    for im in ("reference", impl):
        (g,) = torch.autograd.grad((corr(f1, f2, radius=1, sigma=1.5, temperature=5.0, impl=im) ** 2).sum(), f1,
                                   create_graph=True)
        hv.append(torch.autograd.grad(g.square().sum(), f1)[0])
    assert hv[0].abs().max() > 0
    torch.testing.assert_close(hv[1], hv[0], rtol=1e-10, atol=1e-12, msg=f"seed={seed}")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_does_not_lower_the_precision(impl):
    f1, f2 = _feats(1, 16, 10, 10, secrets.randbits(31), torch.float32)
    ref = _np_brute(f1, f2, 3, 5.0, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = corr(f1, f2, radius=3, impl=impl)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_pick_the_first_maximum_like_the_bruteforce(impl):
    """Textureless input: every in-frame displacement ties at s = 1; all impls take the first
    (row-major) maximum, so the Gaussian and the result are the same everywhere."""
    v = F.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    f1 = v.view(1, 4, 1, 1).expand(1, 4, 6, 7).contiguous()
    f1[..., 2, 3] = -v  # one pixel whose correlations are all <= 0 (relu'd to 0: ties at 0)
    f2 = v.view(1, 4, 1, 1).expand(1, 4, 6, 7).contiguous()
    out = corr(f1, f2, radius=2, sigma=1.0, temperature=10.0, impl=impl)
    np.testing.assert_allclose(out.numpy(), _np_brute(f1, f2, 2, 1.0, 10.0), rtol=1e-9, atol=1e-12)
