"""Launch configuration of the Triton correlation kernels on a GPU: pixels per program (BLOCK_P)
x warps, for several channel counts. Every variant's outputs are checked against the default
launch; the row ``launch_cfg`` picks is marked. Needs a CUDA GPU.

    .venv/bin/python benchmarks/correlation_launch.py [--channels 32,64,128] [--n 128] [--size 28] [--radius 7]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sweep(C: int, N: int, S: int, R: int, blocks, warps, sigma=5.0, temperature=100.0) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from mohico.kernels import correlation_triton as ct
    from mohico.kernels.correlation import backward_torch, stats_torch

    g = torch.Generator().manual_seed(C)
    f1 = F.normalize(torch.randn(N, C, S, S, generator=g), dim=1).cuda()
    f2 = F.normalize(torch.randn(N, C, S, S, generator=g), dim=1).cuda()
    gout = torch.randn(N, 3, S, S, generator=g).cuda()
    ref = ct.correlation_forward_triton(f1, f2, R, sigma, temperature)
    dref = ct.correlation_backward_triton(f1, f2, *ref, gout, R, sigma, temperature)
    picked = ct.launch_cfg(f1, R)
    block_c = picked[4]
    sc = (C, S, S, 1.0 / (2 * sigma * sigma), float(temperature))
    args = (f1, f2, *ref[:3], ref[3].to(torch.int32), ref[4], gout)
    ms = lambda fn: do_bench(fn, warmup=5, rep=30)  # noqa: E731
    st = stats_torch(f1, f2, R, sigma, temperature)
    rows = [dict(C=C, cfg="streaming torch", fwd=ms(lambda: stats_torch(f1, f2, R, sigma, temperature)),
                 bwd_f1=ms(lambda: backward_torch(f1, f2, *st, gout, R, sigma, temperature)), bwd_f2=0.0, ok=True,
                 picked=False)]
    for bp in blocks:
        for nw in warps:
            grid = (N, triton.cdiv(S * S, bp))
            launch = dict(R=R, BLOCK_C=block_c, BLOCK_P=bp, num_warps=nw)
            o = [torch.empty_like(x) for x in ref]
            d1, d2 = torch.empty_like(f1), torch.empty_like(f2)
            fw = lambda: ct.corr_fwd_kernel[grid](f1, f2, *o, *sc, **launch)  # noqa: E731
            b1 = lambda: ct.corr_bwd_f1_kernel[grid](*args, d1, *sc, **launch)  # noqa: E731
            b2 = lambda: ct.corr_bwd_f2_kernel[grid](*args, d2, *sc, **launch)  # noqa: E731
            fw(), b1(), b2()
            torch.cuda.synchronize()
            ok = (all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(o, ref))
                  and torch.allclose(d1, dref[0], atol=1e-4, rtol=1e-4) and torch.allclose(d2, dref[1], atol=1e-4, rtol=1e-4))
            rows.append(dict(C=C, cfg=f"BLOCK_P={bp}, warps={nw}", fwd=ms(fw), bwd_f1=ms(b1), bwd_f2=ms(b2), ok=ok,
                             picked=(bp, nw) == (picked[5], picked[6])))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", default="32,64,128")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--radius", type=int, default=7)
    ap.add_argument("--blocks", default="8,16,32,64")
    ap.add_argument("--warps", default="1,2,4")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: this sweep times GPU launches only")
        return 0
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    rows = []
    for C in ints(args.channels):
        rows += sweep(C, args.n, args.size, args.radius, ints(args.blocks), ints(args.warps))
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, N={args.n}, {args.size}x{args.size}, "
          f"r={args.radius}, float32; ms per call (triton.testing.do_bench)\n")
    print("| C | launch | fwd ms | bwd df1 ms | bwd df2 ms | total ms | same outputs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " **(default)**" if r["picked"] else ""
        print(f"| {r['C']} | {r['cfg']}{mark} | {r['fwd']:.2f} | {r['bwd_f1']:.2f} | {r['bwd_f2']:.2f} | "
              f"{r['fwd'] + r['bwd_f1'] + r['bwd_f2']:.2f} | {r['ok']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
