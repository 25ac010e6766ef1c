"""Measurements behind docs/SCALING.md: bank communication per step, model size, checkpoint write speed.

    .venv/bin/python benchmarks/scaling.py [--world 2,4] [--batch 32] [--bank 1048576] [--save-mb 256]

1. Sharded memory bank (mohico.models.bank), W gloo ranks on this machine: one forward + backward of
   ``MemoryBank.nce`` with B queries per rank, d = 128, the bank full. Every torch.distributed
   collective is intercepted and its payload counted, per rank, against the model in docs/SCALING.md:
   forward all-gather of the queries (W*B*d floats out), LSE max + sum all-reduces (2 x W*B),
   backward all-gather of the upstream gradients (W*B) and all-reduce of the query gradients (W*B*d).
2. Parameters of the default model (configs/base.yaml: r2plus1d_18 + MCL/HiCo heads) -> ZeRO traffic.
3. Checkpoint write: torch.save + fsync of a --save-mb float32 tensor (a bank shard) to --dir.
4. Storage read per clip for untrimmed videos: lengths exponential with mean --mean-min minutes
   (HowTo100M: 15 years of video in 1.22M videos, 6.5 min on average), --kbps KB per second of
   video in the shards (12.3 KB/s: the loader benchmark's samples, video + json + motion maps), V = 3 clips
   per sample: total bytes / total clips = E[bytes] / (V * E[R_v]) at R = 1, fixed R, and the
   length rule R_v = min(R, ceil(L / S)).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bank_model_bytes(B: int, W: int, d: int, elem: int = 4) -> dict:
    """Collective payloads per rank per step of one sharded bank (see the module doc), bytes."""
    return {"all_gather": (W * B * d + W * B) * elem,      # outputs: queries (fwd), upstream grads (bwd)
            "all_reduce": (2 * W * B + W * B * d) * elem}  # LSE max + sum (fwd), query grads (bwd)


def _rank(rank: int, world: int, port: int, B: int, d: int, K: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = {"all_gather": 0, "all_reduce": 0, "calls": 0}
    real_gather, real_reduce = dist.all_gather, dist.all_reduce

    def all_gather(parts, x, *a, **k):
        counts["all_gather"] += sum(p.numel() * p.element_size() for p in parts)
        counts["calls"] += 1
        return real_gather(parts, x, *a, **k)

    def all_reduce(x, *a, **k):
        counts["all_reduce"] += x.numel() * x.element_size()
        counts["calls"] += 1
        return real_reduce(x, *a, **k)

    from mohico.models.bank import MemoryBank

    torch.manual_seed(rank)
    bank = MemoryBank(K, d)
    with torch.no_grad():
        bank.enqueue(torch.nn.functional.normalize(torch.randn(K // world, d), dim=1))
    q = torch.nn.functional.normalize(torch.randn(B, d), dim=1).requires_grad_()
    kp = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
    dist.all_gather, dist.all_reduce = all_gather, all_reduce
    t = time.perf_counter()
    bank.nce(q, kp, 0.1).mean().backward()
    secs = time.perf_counter() - t
    dist.all_gather, dist.all_reduce = real_gather, real_reduce
    torch.save({**counts, "secs": secs, "filled": bank.filled}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def measure_bank(world: int, B: int, d: int, K: int) -> dict:
    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, port, B, d, K, out), nprocs=world, start_method="spawn")
        return torch.load(Path(out) / "0.pt")


def model_params() -> int:
    from mohico.config import load_config
    from mohico.models.pretrain import PretrainModule

    cfg = load_config(ROOT / "configs" / "base.yaml")
    m = PretrainModule(cfg)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def read_per_clip(mean_s: float, kb_per_s: float, R: int, S: float, V: int = 3, n: int = 200_000) -> dict:
    """Bytes read per clip (total bytes / total clips) over exponential video lengths (seeded)."""
    import numpy as np

    L = np.random.default_rng(0).exponential(mean_s, n)
    draws = np.minimum(R, np.maximum(1, np.ceil(L / S))) if S > 0 else np.full(n, R)
    return {"bytes_clip": L.sum() * kb_per_s * 1e3 / (V * draws.sum()), "mean_draws": float(draws.mean())}


def save_speed(mb: int, folder: str) -> float:
    import torch

    x = torch.randn(mb * 2 ** 20 // 4)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "bank.pt"
        t = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(x, f)
            f.flush()
            os.fsync(f.fileno())
        return mb * 2 ** 20 / (time.perf_counter() - t) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="2,4")
    ap.add_argument("--batch", type=int, default=32, help="queries per rank (B)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bank", type=int, default=65536, help="K (all ranks)")
    ap.add_argument("--save-mb", type=int, default=256)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--mean-min", type=float, default=6.5)
    ap.add_argument("--kbps", type=float, default=12.3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    B, d, K = args.batch, args.dim, args.bank
    print(f"\nSharded bank, one nce forward + backward, B = {B} per rank, d = {d}, K = {K}, gloo on this machine\n")
    print("| W | all-gather out measured | model | all-reduce in measured | model | collectives | time s |")
    print("|---|---|---|---|---|---|---|")
    for W in (int(w) for w in args.world.split(",")):
        m = measure_bank(W, B, d, K)
        ref = bank_model_bytes(B, W, d)
        print(f"| {W} | {m['all_gather']} B | {ref['all_gather']} B | {m['all_reduce']} B | {ref['all_reduce']} B "
              f"| {m['calls']} | {m['secs']:.2f} |")
    print(f"\nRead per clip, exponential lengths (mean {args.mean_min} min), {args.kbps} KB/s of video, V = 3\n")
    print("| rule | mean samples per read | KB read per clip |")
    print("|---|---|---|")
    for R, S in ((1, 0.0), (4, 0.0), (8, 0.0), (8, 60.0), (16, 30.0)):
        r = read_per_clip(args.mean_min * 60, args.kbps, R, S)
        name = f"R = {R}" if not S else f"R <= {R}, {S:.0f} s per sample"
        print(f"| {name} | {r['mean_draws']:.2f} | {r['bytes_clip'] / 1e3:.0f} |")
    n = model_params()
    print(f"\nDefault model (configs/base.yaml) trainable parameters: {n} ({n * 4 / 1e6:.0f} MB fp32)")
    print(f"Checkpoint write (torch.save + fsync) of {args.save_mb} MiB to {args.dir}: {save_speed(args.save_mb, args.dir):.0f} MB/s")


if __name__ == "__main__":
    main()
