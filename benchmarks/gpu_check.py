"""`make gpu-check`: every GPU path of mohico in one command, one table, non-zero exit on a failure.

    bash benchmarks/gpu_check.sh [--work /tmp/mohico-gpu-check] [--skip pretrain,...]

On a machine with a CUDA GPU (98 s on one H200, 2026-11-26, most of it the short training runs; table in
benchmarks/RESULTS.md, "First GPU run"):
  dali        synthetic VP9 and H.264 shards through build_loader with DALI "mixed" (NVDEC) vs the
              CPU backend (DALI CPU for VP9, PyAV for H.264): clips/s of each; the same sampler draws
              (keys, frames, boxes equal) and the decoded clips agree (mean |diff| < 3 grey levels);
  bank        Triton bank NCE, K = 131072 and 1048576, fp32 and bf16 banks (B = 256, d = 128,
              tau = 0.07): forward + backward time vs the H100 floor in benchmarks/RESULTS.md
              (benchmarks/kernels.py: h100_floor), loss and dq vs the chunked PyTorch path;
  correlation Triton correlation soft-argmax (128 pairs, C = 64, 28 x 28, radius 7) vs its floor
              (corr_floor) and the streaming PyTorch path;
  pretrain    configs/tiny_cpu.yaml on the GPU: NCCL, bf16 autocast, ZeRO-1, deterministic; one run to
              step 6, one SIGKILLed at step 3 (MOHICO_FAULT) and resumed: the step-6 checkpoints must be
              bitwise equal (weights, optimizer, banks, loader, RNG);
and the peak GPU memory of each. Time vs floor is reported ("slow" above 10x the floor) but only wrong
results and errors fail the run. Without a CUDA GPU it says so and exits 0.

Every step is a function taking the device, so the tests run their CPU equivalents (DALI CPU vs PyAV,
the Triton interpreter vs chunked PyTorch, gloo fp32 pretraining: there its uninterrupted run is real and
the killed and resumed runs are stood in for; tests/test_trainer.py checks the kill + bitwise resume).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SLOW_FACTOR = 10.0


def row(check: str, measured: str, reference: str, ok: bool, note: str = "", peak_mb: float | None = None) -> dict:
    return {"check": check, "measured": measured, "reference": reference, "ok": bool(ok), "note": note,
            "peak_mb": peak_mb}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call (compiles Triton)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------ kernels
def check_bank(device: str, K: int, bank_dtype: str, B: int = 256, d: int = 128, repeats: int = 5,
               floor_us: float | None = None) -> dict:
    """Triton bank NCE forward + backward vs the chunked PyTorch path (loss, dq) and vs its floor,
    with own-video masking on as in training (``q_ids``/``bank_ids``: ~1/17 of the bank shares a
    query's video id, some ids unknown = -1)."""
    import torch
    import torch.nn.functional as F

    from mohico.kernels import bank_nce

    g = torch.Generator(device="cpu").manual_seed(K)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[bank_dtype]
    bank = F.normalize(torch.randn(K, d, generator=g), dim=1).to(device=device, dtype=dt)
    q0 = F.normalize(torch.randn(B, d, generator=g), dim=1).to(device=device, dtype=dt)
    kp = F.normalize(torch.randn(B, d, generator=g), dim=1).to(device=device, dtype=dt)
    q_ids = torch.randint(0, 8, (B,), generator=g).to(device)
    bank_ids = torch.randint(-1, 16, (K,), generator=g).to(device)
    _peak_reset(device)

    def run(impl):
        q = q0.clone().requires_grad_()
        loss = bank_nce(q, kp, bank, 0.07, impl=impl, q_ids=q_ids, bank_ids=bank_ids).mean()
        loss.backward()
        return loss.detach(), q.grad

    loss_t, dq_t = run("triton")
    loss_r, dq_r = run("torch")
    tol = 2e-5 if bank_dtype == "fp32" else 2e-3
    dl = abs(float(loss_t) - float(loss_r)) / max(abs(float(loss_r)), 1e-6)
    dq = float((dq_t.float() - dq_r.float()).abs().max() / dq_r.float().abs().max().clamp_min(1e-12))
    ok = dl <= tol and dq <= tol * 10
    secs = _time(lambda: run("triton"), device, repeats)
    if floor_us is None:
        from kernels import h100_floor

        f = h100_floor(B, K, d, 4 if bank_dtype == "fp32" else 2, 165.0 if bank_dtype == "fp32" else 989.0)
        floor_us = f["fwd_us"] + f["bwd_us"]
    ratio = secs * 1e6 / floor_us
    note = f"rel |dloss| {dl:.1e}, rel max |d dq| {dq:.1e} (tol {tol:g}/{tol * 10:g})"
    if ratio > SLOW_FACTOR and device.startswith("cuda"):
        note += f"; slow: {ratio:.0f}x the floor"
    return row(f"bank NCE K={K} {bank_dtype} fwd+bwd, own-video mask", f"{secs * 1e6:.0f} us", f"floor {floor_us:.0f} us "
               f"({ratio:.1f}x); chunked torch", ok, note, _peak_mb(device))


def check_correlation(device: str, N: int = 128, C: int = 64, S: int = 28, radius: int = 7,
                      repeats: int = 5) -> dict:
    """Triton correlation soft-argmax forward + backward vs the streaming PyTorch path and its floor."""
    import torch
    import torch.nn.functional as F

    from kernels import corr_floor
    from mohico.kernels import local_correlation_softargmax

    g = torch.Generator(device="cpu").manual_seed(N)
    f1 = F.normalize(torch.randn(N, C, S, S, generator=g), dim=1).to(device)
    f2 = F.normalize(torch.randn(N, C, S, S, generator=g), dim=1).to(device)
    w = torch.randn(N, 3, S, S, generator=g).to(device)
    _peak_reset(device)

    def run(impl):
        a, b = f1.clone().requires_grad_(), f2.clone().requires_grad_()
        out = local_correlation_softargmax(a, b, radius=radius, impl=impl)
        (out * w).sum().backward()
        return out.detach(), a.grad, b.grad

    t, r = run("triton"), run("torch")
    err = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(t, r))
    ok = err <= 1e-4
    secs = _time(lambda: run("triton"), device, repeats)
    f = corr_floor(N, C, S, S, radius)
    floor_us = f["fwd_us"] + f["bwd_us"]
    ratio = secs * 1e6 / floor_us
    note = f"rel max |diff| out/df1/df2 {err:.1e} (tol 1e-4)"
    if ratio > SLOW_FACTOR and device.startswith("cuda"):
        note += f"; slow: {ratio:.0f}x the floor"
    return row(f"correlation {N}x{C}x{S}x{S} r={radius} fwd+bwd", f"{secs * 1e6:.0f} us",
               f"floor {floor_us:.0f} us ({ratio:.1f}x); streaming torch", ok, note, _peak_mb(device))


# ------------------------------------------------------------------------------------------ decode
def make_shards(work: Path, codec: str, videos: int = 4, seconds: float = 8.0) -> Path:
    """Synthetic 160x120 videos -> shards (short side 128, GOP 16), cached in ``work``."""
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize

    out = work / f"shards-{codec}"
    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        synthesize(work / f"videos-{codec}", videos=videos, seed=11, codec=codec, fps=15, size=(160, 120),
                   duration=seconds, topics=2)
        write_shards(work / f"videos-{codec}", out, codec=codec, short_side=128, fps=15, gop=16,
                     max_shard_size=10 ** 9, workers=1, flow="dis", progress=False)
    return out


def loader_cfg(device: str, decoder: str, workers: int = 2, crop_size: int = 112):
    """MCL + HiCo views, B = 4; crops of 0.8-1 of the frame (112 px from short side 128 shards:
    the loader refuses crops that upsample the shards)."""
    from mohico.config import Config

    cfg = Config()
    cfg.objectives.mcl.weight = cfg.objectives.hico.weight = 1.0
    d = cfg.data
    d.batch_size, d.num_workers, d.clip_len, d.frame_stride, d.crop_size = 4, workers, 16, 2, crop_size
    cfg.sampling.crop_area = [0.8, 1.0]
    d.shuffle_buffer, d.device, d.decoder = 4, device, decoder
    return cfg


def timed_batches(cfg, shards: Path, n: int):
    """``(batches, clips/s)``: one warm-up batch, then ``n`` timed batches of ``build_loader(cfg)``."""
    import torch

    from mohico.datasets.load.pipeline import build_loader

    loader = build_loader(cfg, str(shards))
    it = iter(loader)
    out = [next(it)]                        # warm-up: workers, DALI pipeline
    t = time.perf_counter()
    for _ in range(n):
        b = next(it)
        if b.clips.is_cuda:
            torch.cuda.synchronize()
        out.append(b)
    secs = time.perf_counter() - t
    loader.close()
    clips = sum(b.clips.shape[0] * b.clips.shape[1] for b in out[1:])
    return out, clips / secs


def check_decode(work: Path, codec: str, device: str, baseline: str, batches: int = 8, shards: Path | None = None,
                 workers: int = 2, crop_size: int = 112) -> dict:
    """Loader clips/s with DALI on ``device`` ("gpu": mixed) vs ``baseline`` ("cpu": DALI CPU or
    PyAV, whatever the CPU backend uses for the codec; "pyav"); same draws, same pixels."""
    shards = shards or make_shards(work, codec)
    cand_cfg = loader_cfg(device, "dali", workers, crop_size)
    base_cfg = loader_cfg("cpu", "pyav" if baseline == "pyav" else "auto", workers, crop_size)
    _peak_reset("cuda" if device == "gpu" else "cpu")
    got, rate = timed_batches(cand_cfg, shards, batches)
    peak = _peak_mb("cuda" if device == "gpu" else "cpu")
    ref, base_rate = timed_batches(base_cfg, shards, batches)
    same_draws = all(a.key == b.key and bool((a.frames == b.frames).all())
                     and bool((a.boxes == b.boxes).all()) for a, b in zip(got, ref))
    diff = max(float((a.clips.cpu() - b.clips).abs().mean()) * 0.225 * 255 for a, b in zip(got, ref))
    ok = same_draws and diff < 3.0
    name = f"decode {codec}: DALI {'mixed' if device == 'gpu' else 'cpu'} vs {baseline}"
    return row(name, f"{rate:.1f} clips/s", f"{base_rate:.1f} clips/s ({rate / base_rate:.1f}x)", ok,
               f"same draws: {same_draws}, mean |diff| {diff:.2f} grey levels (tol 3)", peak)


# ------------------------------------------------------------------------------------------ training
def checkpoint_differences(a: Path, b: Path) -> list[str]:
    """Names of tensors/scalars that differ between two checkpoint folders' .pt files (loader
    statistics counters and timestamps excluded: not training state)."""
    import torch

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{prefix}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from flat(v, f"{prefix}[{i}]")
        elif torch.is_tensor(obj) or isinstance(obj, (int, float, str, bool)) or obj is None:
            yield prefix, obj

    names = sorted(p.name for p in a.glob("*.pt"))
    if names != sorted(p.name for p in b.glob("*.pt")):
        return [f"file lists differ: {names} vs {sorted(p.name for p in b.glob('*.pt'))}"]
    bad = []
    for name in names:
        x, y = ({k: v for k, v in flat(torch.load(p / name, map_location="cpu", weights_only=False))
                 if ".loader.counters." not in k and not k.startswith(".mohico.")
                 and not k.endswith(("time", "load_universal"))} for p in (a, b))
        if x.keys() != y.keys():
            bad.append(f"{name}: keys differ")
            continue
        for k in x:
            same = (torch.is_tensor(x[k]) and torch.is_tensor(y[k]) and x[k].dtype == y[k].dtype
                    and torch.equal(x[k], y[k])) if torch.is_tensor(x[k]) else x[k] == y[k]
            if not same:
                bad.append(f"{name}{k}")
    return bad


def _train(run_dir: Path, shards: Path, overrides: list[str], env: dict, timeout: float) -> int:
    cmd = [sys.executable, "-m", "mohico", "train", str(ROOT / "configs" / "tiny_cpu.yaml"), "--nproc", "1",
           f"run.dir={run_dir}", f"data.shards={shards}", *overrides]
    with open(run_dir.parent / f"{run_dir.name}.out", "a") as out:
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False).returncode


def check_pretrain(work: Path, device: str, steps: int = 6, kill_at: int = 3, timeout: float = 240,
                   shards: Path | None = None) -> dict:
    """tiny_cpu.yaml at one rank on ``device`` ("gpu": NCCL + bf16; "cpu": gloo + fp32), ZeRO-1:
    an uninterrupted run vs one SIGKILLed at step ``kill_at`` and resumed; the final checkpoints
    must be bitwise equal."""
    import shutil

    shards = shards or make_shards(work, "vp9")
    over = [f"trainer.max_steps={steps}", "checkpoint.every_steps=2", "checkpoint.keep=4", "trainer.zero_stage=1",
            "trainer.deterministic=true", "trainer.log_every=2", "wandb.mode=disabled", f"data.device={device}",
            f"trainer.precision={'bf16' if device == 'gpu' else 'fp32'}"]
    runs = work / f"pretrain-{device}"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")} if device == "gpu" else {
        "CUDA_VISIBLE_DEVICES": ""}
    t = time.perf_counter()
    codes = [_train(runs / "whole", shards, over, env, timeout)]
    secs = time.perf_counter() - t
    codes.append(_train(runs / "killed", shards, over, {**env, "MOHICO_FAULT": f"step:{kill_at}:0"}, timeout))
    codes.append(_train(runs / "killed", shards, over, env, timeout))
    tag = f"step_{steps:08d}"
    a, b = runs / "whole" / "checkpoints" / tag, runs / "killed" / "checkpoints" / tag
    diffs = checkpoint_differences(a, b) if a.is_dir() and b.is_dir() else ["a final checkpoint is missing"]
    killed = codes[1] != 0
    ok = codes[0] == 0 and killed and codes[2] == 0 and not diffs
    peak = None
    log = runs / "whole" / "logs" / "metrics.jsonl"
    if log.exists():
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        mem = [r["perf/memory_mb"] for r in rows if "perf/memory_mb" in r]
        peak = max(mem) if mem and device == "gpu" else None
    note = (f"exit codes whole/killed/resumed {codes}; " +
            ("checkpoints bitwise equal" if not diffs else f"{len(diffs)} differ, e.g. {diffs[:3]}") +
            f"; logs in {runs}")
    comm = "NCCL + bf16" if device == "gpu" else "gloo + fp32"
    return row(f"pretrain tiny, ZeRO-1, {comm}, kill at {kill_at} + resume", f"{steps} steps in {secs:.0f} s",
               "bitwise-equal final checkpoint", ok, note, peak)


# ------------------------------------------------------------------------------------------ main
def plan(work: Path, device: str) -> list[tuple[str, object]]:
    """(step name, thunk) for every check on ``device`` ("gpu" or "cpu")."""
    dev = "cuda" if device == "gpu" else "cpu"
    steps = [("dali", lambda: check_decode(work, "vp9", device, "cpu")),
             ("dali", lambda: check_decode(work, "h264", device, "cpu"))]
    for K in (131072, 1048576):
        for dt in ("fp32", "bf16"):
            steps.append(("bank", lambda K=K, dt=dt: check_bank(dev, K, dt)))
    steps.append(("correlation", lambda: check_correlation(dev)))
    steps.append(("pretrain", lambda: check_pretrain(work, device)))
    return steps


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print("| check | measured | reference | peak GPU MiB | result | notes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        print(f"| {r['check']} | {r['measured']} | {r['reference']} | {peak} | {'ok' if r['ok'] else 'FAIL'} "
              f"| {r['note']} |")


def run_checks(steps, skip=()) -> list[dict]:
    rows = []
    for name, thunk in steps:
        if name in skip:
            continue
        print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(thunk())
        except Exception as e:  # noqa: BLE001 - a failing step is a row, the others still run
            traceback.print_exc()
            rows.append(row(name, "error", "-", False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mohico-gpu-check")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: dali,bank,correlation,pretrain")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("[gpu-check] no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check. "
              "Run `make gpu-check` on a GPU node.")
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    t = time.perf_counter()
    rows = run_checks(plan(work, "gpu"), {s for s in args.skip.split(",") if s})
    name = torch.cuda.get_device_name(0)
    print_table(rows, f"gpu-check on {name}, torch {torch.__version__}, {time.perf_counter() - t:.0f} s "
                      f"(floors: H100 SXM, benchmarks/RESULTS.md)")
    failed = [r["check"] for r in rows if not r["ok"]]
    print(f"\n[gpu-check] {len(rows) - len(failed)}/{len(rows)} ok" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
