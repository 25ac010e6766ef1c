"""Kernel benchmarks: chunked bank NCE vs the naive ``logits = q @ bank.T``, side by side.

CPU (this machine): for each bank size K, one fresh subprocess per variant measures the peak
RSS added by one forward + backward (VmHWM reset through /proc/self/clear_refs after the
inputs exist; torch's CPU allocator has no peak statistics) and the median wall time.
GPU (when CUDA is present): the same for the Triton kernels, with torch.cuda peak stats.
Also prints the on-paper H100 floor (bytes / FLOPs) of each Triton kernel.

    .venv/bin/python benchmarks/kernels.py                 # K = 64K, 256K, 1M; B = 256, d = 128
    .venv/bin/python benchmarks/kernels.py --ks 65536 --repeats 1   # quick
    .venv/bin/python benchmarks/kernels.py --ks 65536 --corr        # + correlation impls
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MiB = 1024 ** 2


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_step(variant: str, B: int, K: int, d: int, tile: int, dev):
    """One forward + backward of the variant; returns a float to check the variants agree."""
    import torch
    import torch.nn.functional as F

    from mohico.kernels import bank_nce, local_correlation_softargmax

    if variant.startswith("corr-"):  # K = frame pairs, d = channels, B = H = W
        f1 = F.normalize(torch.randn(K, d, B, B, device=dev), dim=1)
        f2 = F.normalize(torch.randn(K, d, B, B, device=dev), dim=1)
        impl = variant[len("corr-"):]

        def step():
            a, b = f1.clone().requires_grad_(), f2.clone().requires_grad_()
            out = local_correlation_softargmax(a, b, radius=7, impl=impl)
            out.sum().backward()
            return out.mean().item()
        return step

    bank = torch.empty(K, d, device=dev).normal_()
    bank /= bank.norm(dim=1, keepdim=True)
    q0 = F.normalize(torch.randn(B, d, device=dev), dim=1)
    kp = F.normalize(torch.randn(B, d, device=dev), dim=1)
    impl = {"naive": "reference", "chunked": "torch", "triton": "triton"}[variant]

    def step():
        q = q0.clone().requires_grad_()
        loss = bank_nce(q, kp, bank, 0.07, impl=impl, tile=tile).mean()
        loss.backward()
        return loss.item()
    return step


def _child(variant: str, B: int, K: int, d: int, tile: int, repeats: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    step = _make_step(variant, B, K, d, tile, dev)
    step()  # warm-up (and Triton compile)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS to the current RSS
        base = _rss_kib("VmRSS:") * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM:") * 1024 - base
    times.sort()
    return {"variant": variant, "K": K, "time_s": times[len(times) // 2], "peak_extra_bytes": max(peak, 0),
            "loss": loss}


def _run_child(args, variant: str, K: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--ks", str(K), "--batch", str(args.batch),
           "--dim", str(args.dim), "--tile", str(args.tile), "--repeats", str(args.repeats), "--device", device,
           "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child {variant} K={K} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def h100_floor(B: int, K: int, d: int, bank_bytes: int, tflops: float, bw: float = 3.0e12,
               exp_rate: float = 3.9e12) -> dict:
    """Bank NCE on paper: the bank read once per pass; dots at `tflops`; bytes at `bw` B/s;
    one exp per logit per pass on the SFUs (132 SMs x 16/clk x 1.83 GHz ~ 3.9e12/s)."""
    fwd_bytes = K * d * bank_bytes + 2 * B * d * 4 + B * 4
    fwd_flops = 2.0 * B * K * d
    bwd_bytes = fwd_bytes + B * d * 4
    bwd_flops = 4.0 * B * K * d  # recompute the logits, then softmax @ bank
    exps = B * K
    t = lambda by, fl: max(by / bw, fl / (tflops * 1e12), exps / exp_rate)  # noqa: E731
    return {"fwd_MB": fwd_bytes / 1e6, "fwd_GFLOP": fwd_flops / 1e9, "fwd_us": t(fwd_bytes, fwd_flops) * 1e6,
            "bwd_MB": bwd_bytes / 1e6, "bwd_GFLOP": bwd_flops / 1e9, "bwd_us": t(bwd_bytes, bwd_flops) * 1e6,
            "exp_G": exps / 1e9, "exp_us": exps / exp_rate * 1e6, "mem_us": fwd_bytes / bw * 1e6}


def corr_floor(N: int, C: int, H: int, W: int, r: int, tflops: float = 67.0, bw: float = 3.0e12) -> dict:
    """Fused correlation on paper: f1, f2 read once (window re-reads hit L1/L2); FMA-bound."""
    P = (2 * r + 1) ** 2
    pix = N * H * W
    fwd_bytes = 2 * pix * C * 4 + pix * 5 * 4
    fwd_flops = 2 * P * 2.0 * C * pix  # two passes over the window, C mul-adds each
    bwd_bytes = 2 * pix * C * 4 * 2 + pix * 8 * 4
    bwd_flops = 2 * P * 4.0 * C * pix  # two kernels, each a dot and an axpy per displacement
    t = lambda by, fl: max(by / bw, fl / (tflops * 1e12))  # noqa: E731
    return {"fwd_MB": fwd_bytes / 1e6, "fwd_GFLOP": fwd_flops / 1e9, "fwd_us": t(fwd_bytes, fwd_flops) * 1e6,
            "bwd_MB": bwd_bytes / 1e6, "bwd_GFLOP": bwd_flops / 1e9, "bwd_us": t(bwd_bytes, bwd_flops) * 1e6,
            "volume_MB": P * pix * 4 / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="65536,262144,1048576", help="comma-separated bank sizes")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tile", type=int, default=4096, help="bank rows per chunk (chunked PyTorch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the 2 shared cores here make multi-thread timings noise)")
    p.add_argument("--corr", action="store_true", help="also compare the correlation implementations")
    p.add_argument("--corr-pairs", type=int, default=16, help="frame pairs for --corr (C=64, 28x28, r=7)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.child:
        print(json.dumps(_child(args.child, args.batch, ks[0], args.dim, args.tile, args.repeats, args.device,
                                args.threads)))
        return

    B, d = args.batch, args.dim
    print(f"# bank NCE forward+backward, B={B}, d={d}, tile={args.tile}, device={args.device}, "
          f"torch threads={args.threads}")
    print(f"{'K':>9} | {'naive s':>8} {'naive MiB':>10} | {'chunked s':>9} {'chunked MiB':>11} | "
          f"{'time ratio':>10} {'mem ratio':>9} | {'B*K*4 MiB':>9} {'B*tile*4 MiB':>12} | {'|dloss|':>8}")
    variants = ["naive", "chunked"] + (["triton"] if args.device.startswith("cuda") else [])
    for K in ks:
        r = {v: _run_child(args, v, K, args.device) for v in variants}
        n, c = r["naive"], r["chunked"]
        print(f"{K:>9} | {n['time_s']:>8.3f} {n['peak_extra_bytes'] / MiB:>10.1f} | {c['time_s']:>9.3f} "
              f"{c['peak_extra_bytes'] / MiB:>11.1f} | {c['time_s'] / n['time_s']:>10.2f} "
              f"{c['peak_extra_bytes'] / max(n['peak_extra_bytes'], 1):>9.3f} | {B * K * 4 / MiB:>9.0f} "
              f"{B * args.tile * 4 / MiB:>12.1f} | {abs(c['loss'] - n['loss']):>8.1e}")
        if "triton" in r:
            t = r["triton"]
            print(f"{'':>9}   triton: {t['time_s'] * 1e3:.3f} ms, peak extra {t['peak_extra_bytes'] / MiB:.1f} MiB")

    if args.corr:
        N, C, S = args.corr_pairs, 64, 28
        print(f"\n# correlation soft-argmax forward+backward, {N} pairs, C={C}, {S}x{S}, radius 7, "
              f"device={args.device}, torch threads={args.threads}")
        print(f"{'impl':>10} | {'time s':>7} | {'peak extra MiB':>14} | {'mean out':>9}")
        ca = argparse.Namespace(**{**vars(args), "batch": S, "dim": C})
        variants = ["reference", "torch"] + (["triton"] if args.device.startswith("cuda") else [])
        for v in variants:
            r = _run_child(ca, f"corr-{v}", N, args.device)
            print(f"{v:>10} | {r['time_s']:>7.3f} | {r['peak_extra_bytes'] / MiB:>14.1f} | {r['loss']:>9.6f}")
        print(f"(the (N, 225, H, W) float32 volume alone is {N * 225 * S * S * 4 / MiB:.0f} MiB; "
              f"the reference's unfold is {N * C * 225 * S * S * 4 / MiB:.0f} MiB)")

    print("\n# H100 SXM on paper (3.0 TB/s; bf16 989 TFLOPS dense; 3xTF32 = 3 TF32 MMAs ~ 165 TFLOPS; "
          "fp32 FMA 67 TFLOPS; 3.9e12 exp/s)")
    for K in (131072, 1048576):
        for name, bb, tf in (("fp32 bank (3xTF32 dots)", 4, 165.0), ("bf16 bank+q", 2, 989.0)):
            f = h100_floor(256, K, 128, bb, tf)
            print(f"bank NCE B=256 K={K} d=128 {name}: fwd {f['fwd_MB']:.1f} MB ({f['mem_us']:.0f} us), "
                  f"{f['fwd_GFLOP']:.1f} GFLOP, {f['exp_G']:.3f} G exp ({f['exp_us']:.0f} us) -> {f['fwd_us']:.0f} us; "
                  f"bwd {f['bwd_MB']:.1f} MB, {f['bwd_GFLOP']:.1f} GFLOP -> {f['bwd_us']:.0f} us")
    f = corr_floor(128, 64, 28, 28, 7)
    print(f"correlation N=128 C=64 28x28 r=7 fp32: fwd {f['fwd_MB']:.1f} MB {f['fwd_GFLOP']:.1f} GFLOP -> "
          f"{f['fwd_us']:.0f} us; bwd {f['bwd_MB']:.1f} MB {f['bwd_GFLOP']:.1f} GFLOP -> {f['bwd_us']:.0f} us; "
          f"volume not written: {f['volume_MB']:.0f} MB")


if __name__ == "__main__":
    main()
