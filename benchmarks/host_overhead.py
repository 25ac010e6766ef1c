"""Host overhead of the trainer's step: the real trainer against a bare loop, same model, same batch size.

    PYTHONPATH=. .venv/bin/python benchmarks/host_overhead.py [--config configs/tiny_cpu.yaml] [--steps 10] [--windows 4]
        [--work /tmp/mohico-host-overhead] [--profile 0]

In one process: (1) the trainer (``mohico.trainer.train.train``: DeepSpeed engine, ZeRO, loader hand-off,
watchdog beats, logging, the non-finite guard, the EMA update) for ``windows x steps`` steps on synthetic
shards, one log window per ``steps`` (the first is warm-up: workers, DeepSpeed init); (2) the bare loop,
``windows - 1`` blocks of ``steps``:
the same PretrainModule and optimizer, forward + backward + ``optimizer.step()`` + EMA update on one batch
of the same shape held in memory, no DeepSpeed, no loader. Overhead = trainer step time / bare step time;
the trainer's step also waits for the loader (its data-wait fraction is reported, and the ratio without it).
``--profile N`` runs cProfile over N extra trainer steps and prints the top functions by own time.

benchmarks/gpu_proof.py reuses these functions on the GPU (R(2+1)D-18, bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_cfg(config: str | Path, shards: Path, run_dir: Path, steps: int, overrides=(), windows: int = 2):
    """``config`` set up for a timing run: ``windows * steps`` steps, one log window per ``steps``, no W&B,
    no checkpoint before the end, a fresh run dir."""
    from mohico.config import load_config

    return load_config(config, [f"data.shards={shards}", f"run.dir={run_dir}", f"trainer.max_steps={windows * steps}",
                                f"trainer.log_every={steps}", f"checkpoint.every_steps={10 ** 9}",
                                "checkpoint.resume=never", "wandb.mode=disabled", "wandb.image_every=0",
                                *overrides])


def trainer_steps(cfg) -> dict:
    """Run the trainer in this process; from metrics.jsonl, the log windows after the first (warm-up):
    the fastest window's step time, clips/s, data-wait fraction (the machine may be shared: the
    fastest window is the least disturbed one), the median window's step time, and the peak memory."""
    from mohico.trainer.train import train

    t = time.perf_counter()
    code = train(cfg)
    total = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"the trainer exited with code {code}; logs in {cfg.run.dir}")
    rows = [json.loads(x) for x in (Path(cfg.run.dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    win = [r for r in rows if "perf/step_time_s" in r]
    if len(win) < 2:
        raise RuntimeError(f"expected 2 log windows in {cfg.run.dir}/logs/metrics.jsonl, got {len(win)}")
    timed = sorted(win[1:], key=lambda r: r["perf/step_time_s"])
    w = timed[0]
    return {"step_s": w["perf/step_time_s"], "clips_per_s": w["perf/clips_per_s"],
            "data_wait_frac": w["perf/data_wait_frac"], "memory_mb": max(r["perf/memory_mb"] for r in win),
            "step_s_median": timed[len(timed) // 2]["perf/step_time_s"],
            "windows_step_s": [r["perf/step_time_s"] for r in win[1:]],
            "windows_data_wait_frac": [r["perf/data_wait_frac"] for r in win[1:]],
            "steps": cfg.trainer.log_every, "wall_s": total, "run_dir": str(cfg.run.dir)}


def one_batch(cfg):
    """One batch of ``cfg``'s loader (its shapes and video ids), on the CPU."""
    from mohico.datasets.load.pipeline import build_loader

    loader = build_loader(cfg, cfg.data.shards)
    try:
        return next(iter(loader)).to("cpu")
    finally:
        loader.close()


def bare_steps(cfg, batch, steps: int, device: str = "cpu", random: bool = False, memory: bool = False,
               blocks: int = 1) -> dict:
    """The bare loop: PretrainModule(cfg) + its optimizer, ``blocks`` blocks of ``steps`` timed steps
    (after 2 warm-up steps; the fastest block's time per step, and the median block's)
    of forward + backward + step + EMA on ``batch`` (``random``: random tensors of its shapes), bf16
    autocast on CUDA when the config trains in bf16. ``memory``: the parts of peak memory (CUDA only
    measured; parameters, gradients, optimizer state and banks counted everywhere)."""
    import torch

    from mohico.models.pretrain import PretrainModule
    from mohico.trainer.engine import resolve_precision
    from mohico.trainer.optim import build_optimizer

    torch.manual_seed(cfg.trainer.seed)
    module = PretrainModule(cfg).to(device)
    opt = build_optimizer(cfg, module)
    clips, motion = batch.clips.to(device), (batch.motion.to(device) if batch.motion is not None else None)
    if random:
        clips = torch.randn_like(clips)
        motion = torch.rand_like(motion) if motion is not None else None
    vid = batch.video_id.to(device) if batch.video_id is not None else None
    cuda = device.startswith("cuda")
    amp = cuda and resolve_precision(cfg) == "bf16"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss, _ = module(clips, motion, 0.5, video_id=vid)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            module.momentum_update()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out: dict = {}
    for _ in range(2):                    # warm-up (the banks move to the device on their first use)
        step()
    sync()
    if memory:
        mb = lambda ts: sum(t.numel() * t.element_size() for t in ts) / 2 ** 20  # noqa: E731
        trained = [p for p in module.parameters() if p.requires_grad]
        out["params_mb"] = mb(module.parameters())
        out["grads_mb"] = mb(trained)
        out["optimizer_mb"] = mb(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        out["banks_mb"] = mb(t for b in module.banks().values() for t in (b.keys, b.ids))
        out["buffers_mb"] = mb(module.buffers())          # BN statistics and the like
        out["params"] = sum(p.numel() for p in module.parameters())
        out["trained_params"] = sum(p.numel() for p in trained)
    if memory and cuda:       # activations: one forward + backward's peak over what was there, less the grads
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss, _ = module(clips, motion, 0.5, video_id=vid)
        loss.backward()
        sync()
        out["activations_mb"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20 - out["grads_mb"]
        opt.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t) / steps)
    secs = min(times)
    out.update({"step_s": secs, "clips_per_s": clips.shape[0] * clips.shape[1] / secs, "steps": steps,
                "step_s_median": sorted(times)[len(times) // 2], "blocks_step_s": times})
    if memory and cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    del module, opt
    return out


def profile_trainer(cfg, steps: int, top: int = 15) -> str:
    """cProfile over a trainer run of ``2 * steps`` steps: the top functions by own time."""
    import cProfile
    import io
    import pstats

    from mohico.trainer.train import train

    prof = cProfile.Profile()
    prof.enable()
    train(cfg)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def print_table(rows: list[tuple[str, dict]], title: str) -> None:
    print(f"\n{title}\n")
    print("| loop | s/step (fastest window) | steps/s | clips/s | data wait | s/step (median window) | ratio to bare |")
    print("|---|---|---|---|---|---|---|")
    bare = dict(rows)["bare loop"]["step_s"]
    for name, r in rows:
        wait = f"{100 * r['data_wait_frac']:.1f}%" if "data_wait_frac" in r else "-"
        med = f"{r['step_s_median']:.4f}" if "step_s_median" in r else "-"
        print(f"| {name} | {r['step_s']:.4f} | {1 / r['step_s']:.2f} | {r['clips_per_s']:.1f} | {wait} | {med} "
              f"| {r['step_s'] / bare:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--steps", type=int, default=10, help="steps per timed window (trainer) or block (bare loop)")
    ap.add_argument("--windows", type=int, default=4,
                    help="trainer log windows (the first is warm-up); bare blocks: one less")
    ap.add_argument("--work", default="/tmp/mohico-host-overhead")
    ap.add_argument("--profile", type=int, default=0, help="also cProfile a trainer run of 2 x N steps")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from gpu_check import make_shards

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work, "vp9")
    run = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_cfg(args.config, shards, run / "trainer", args.steps, windows=args.windows)
    load = os.getloadavg()
    tr = trainer_steps(cfg)
    bare = bare_steps(cfg, one_batch(cfg), args.steps, blocks=args.windows - 1)
    busy = tr["step_s"] * (1 - tr["data_wait_frac"])
    rows = [("trainer (mohico.trainer.train)", tr),
            ("trainer minus data wait", {"step_s": busy, "clips_per_s": tr["clips_per_s"] * tr["step_s"] / busy}),
            ("bare loop", bare)]
    print_table(rows, f"host overhead: {Path(args.config).name}, batch {cfg.data.batch_size} x "
                      f"{cfg.objectives.num_views} views, {args.windows - 1} timed windows/blocks of {args.steps} steps, "
                      f"torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads, load average before {load[0]:.2f}")
    print(f"\noverhead = trainer / bare = {tr['step_s'] / bare['step_s']:.3f} "
          f"(without the data wait: {busy / bare['step_s']:.3f}; medians: "
          f"{tr['step_s_median'] / bare['step_s_median']:.3f}); target <= 1.05")
    if args.profile:
        print(profile_trainer(load_cfg(args.config, shards, run / "profiled", args.profile), args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
