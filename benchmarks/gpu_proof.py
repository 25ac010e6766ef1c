"""`make gpu-proof`: the production step on one GPU, stage by stage, one table (issue 31).

    bash benchmarks/gpu_proof.sh [--out /tmp/mohico-gpu-proof] [--smoke] [--only step,memory,...]

Each stage writes OUT/<stage>.json (atomically) as soon as it ends, so a run cut short keeps what
was done; then one table is printed (and written to OUT/table.md). Stages, on a CUDA machine:

  step      R(2+1)D-18, 16 x 112 x 112, bf16, MCL (the paper variant: the official one reads 4 views,
            HiCo 3 others) + HiCo, the papers' bank (K = 131072), batch 32 per GPU, ZeRO-1: the real trainer (mohico.trainer.train, in this
            process) reading synthetic H.264 shards (short side 256) made here, DALI "mixed"; clips/s,
            model FLOP utilisation (FLOPs of one step counted once with torch's FlopCounterMode, against
            989 TFLOP/s bf16 dense on H100/H200; the Triton bank kernel is not counted: ~0.1% of the step),
            data-wait fraction, peak memory; beside it the same model's bare forward/backward/step loop on
            random tensors of the batch's shapes. Overhead = trainer step time / bare step time.
  memory    the bare loop's peak memory against parameters + gradients + optimizer state + buffers
            (banks) + activations (measured: the peak of one forward + backward over what was allocated
            before it), the trainer's peak beside it, and the ZeRO bucket sizes the engine sets.
  decode    the loader at the step's batch and crop: DALI "mixed" against the CPU backend with every
            core as workers, for short side 128 and 256, H.264 and VP9; whether decode keeps up with
            the trainer's clips/s.
  kernels   Triton bank NCE (bf16 bank, own-video mask) at K = 131072 and 1048576, and the correlation
            soft-argmax, each against its floor (benchmarks/gpu_check.py's checks).
  ablation  not run here: the motion benchmark's three arms at ~3 min each plus their evaluations do
            not fit the budget beside the other stages (run benchmarks/motion_ablation.py on its own).

Expected time on one H100/H200: about 6 minutes; ``--budget`` (540 s) writes a stage not started
by then as not run, so the whole stays within about 9 minutes. Without a CUDA GPU (or with --smoke)
every stage runs at toy size on the CPU (configs/tiny_cpu.yaml, a small VP9 shard set, DALI CPU vs
PyAV, the Triton interpreter), says so, and exits 0: the numbers of a smoke run are not the GPU's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
STAGES = ("step", "memory", "decode", "kernels", "ablation")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}      # dense, SXM


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------ set-up
def make_shards(work: Path, codec: str, short_side: int, videos: int = 8, seconds: float = 6.0,
                workers: int = 1) -> Path:
    """Synthetic videos (30 fps, 4:3, just above ``short_side``) -> shards at ``short_side``, cached."""
    from mohico.datasets.synthetic.synth import synthesize
    from mohico.datasets.write.shards import write_shards

    out = work / f"shards-{codec}-{short_side}"
    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        h = short_side
        synthesize(work / f"videos-{codec}-{short_side}", videos=videos, seed=31, codec=codec, fps=30,
                   size=(h * 4 // 3 // 2 * 2, h), duration=seconds, topics=2, workers=workers)
        write_shards(work / f"videos-{codec}-{short_side}", out, codec=codec, short_side=short_side, fps=30,
                     gop=16, max_shard_size=10 ** 9, workers=workers, flow="dis", progress=False)
    return out


def step_config(mode: str, shards: Path, run_dir: Path, steps: int):
    """The config of the step stage: the GPU's production step, or tiny_cpu.yaml for the smoke run."""
    from host_overhead import load_cfg

    if mode == "smoke":
        return load_cfg(ROOT / "configs" / "tiny_cpu.yaml", shards, run_dir, steps,
                        ["data.device=cpu", "trainer.precision=fp32"], windows=2)
    return load_cfg(ROOT / "configs" / "mcl_r2plus1d_k400.yaml", shards, run_dir, steps, [
        "data.batch_size=32", "data.clip_len=16", "data.crop_size=112", "data.motion_size=14",
        "data.device=gpu", "data.decoder=dali", f"data.num_workers={min(8, os.cpu_count() or 1)}",
        "data.shuffle_buffer=32", "data.reference_fps=30",
        "trainer.precision=bf16", "trainer.zero_stage=1", "bank.size=131072",
        "objectives.mcl.variant=paper", "objectives.hico.weight=1.0", "objectives.hico.use_bank=true",
        "objectives.hico.tau=0.1",
        "objectives.hico.visual_hidden=1024"], windows=3)


# ------------------------------------------------------------------------------------------ stages
def stage_step(ctx: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from host_overhead import bare_steps, one_batch, trainer_steps
    from mohico.trainer.engine import resolve_precision

    mode, work, steps = ctx["mode"], ctx["work"], ctx["steps"]
    cfg = step_config(mode, ctx["step_shards"], work / f"run-{time.strftime('%H%M%S')}", steps)
    tr = trainer_steps(cfg)
    device = "cuda" if mode == "gpu" else "cpu"
    batch = one_batch(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare = bare_steps(cfg, batch, steps, device, random=True, memory=True, blocks=1 if mode == "smoke" else 2)
    # FLOPs of one step, counted once: forward + backward of the same module on the same shapes
    from mohico.models.pretrain import PretrainModule

    torch.manual_seed(0)
    m = PretrainModule(cfg).to(device)
    clips = torch.randn_like(batch.clips).to(device)
    motion = batch.motion.to(device) if batch.motion is not None else None
    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
        loss, _ = m(clips, motion, 0.5, video_id=batch.video_id.to(device))
        loss.backward()
    flops = float(fc.get_total_flops())
    del m
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_tflops(name) if device == "cuda" else None
    mfu = {k: (flops / r["step_s"] / (peak * 1e12) if peak else None) for k, r in (("trainer", tr), ("bare", bare))}
    clips_per_step = batch.clips.shape[0] * batch.clips.shape[1]
    return {"device": name, "model": cfg.model.backbone, "clip": [cfg.data.clip_len, cfg.data.crop_size,
            cfg.data.crop_size], "batch": cfg.data.batch_size, "views": int(batch.clips.shape[1]),
            "clips_per_step": clips_per_step, "bank": cfg.bank.size, "precision": resolve_precision(cfg),
            "shards": str(ctx["step_shards"]), "trainer": tr, "bare": bare,
            "flops_per_step": flops, "peak_tflops": peak, "mfu": mfu,
            "overhead": tr["step_s"] / bare["step_s"],
            "overhead_without_data_wait": tr["step_s"] * (1 - tr["data_wait_frac"]) / bare["step_s"],
            "summary": f"trainer {tr['clips_per_s']:.1f} clips/s ({tr['step_s'] * 1e3:.0f} ms/step, data wait "
                       f"{100 * tr['data_wait_frac']:.0f}%), bare {bare['clips_per_s']:.1f} clips/s; overhead "
                       f"{tr['step_s'] / bare['step_s']:.2f}x; MFU "
                       + (f"{100 * mfu['trainer']:.1f}% (bare {100 * mfu['bare']:.1f}%)" if peak else "n/a")
                       + f"; {flops / 1e9:.1f} GFLOP/step; peak {tr['memory_mb']:.0f} MB"}


def stage_memory(ctx: dict) -> dict:
    from mohico.trainer.engine import bucket_size

    step = ctx["results"].get("step")
    if not step or step.get("status") != "ok":
        raise RuntimeError("needs the step stage's measurements (it did not finish)")
    b = step["bare"]
    parts = {k: b[k] for k in ("params_mb", "grads_mb", "optimizer_mb", "banks_mb", "buffers_mb")}
    if "activations_mb" in b:
        parts["activations_mb"] = b["activations_mb"]
    total = sum(parts.values())
    bucket = bucket_size(b["params"])
    out = {"parts_mb": parts, "sum_mb": total, "bare_peak_mb": b.get("peak_mb"),
           "trainer_peak_mb": step["trainer"]["memory_mb"], "params": b["params"],
           "zero_bucket_elements": bucket, "zero_bucket_mb_fp32": bucket * 4 / 2 ** 20,
           "trainer_peak_is": "torch.cuda.max_memory_allocated" if ctx["mode"] == "gpu" else
           "the process's max RSS (CPU: not comparable to the sum)"}
    shown = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in parts.items())
    if ctx["mode"] == "gpu":
        out["summary"] = (f"sum {total:.0f} MB ({shown}); bare peak {b['peak_mb']:.0f} MB, trainer peak "
                          f"{out['trainer_peak_mb']:.0f} MB (ZeRO buckets {bucket:,} elements)")
    else:
        out["summary"] = (f"sum {total:.0f} MB ({shown}; activations not measured on CPU); trainer max RSS "
                          f"{out['trainer_peak_mb']:.0f} MB; ZeRO buckets {bucket:,} elements")
    return out


def stage_decode(ctx: dict) -> dict:
    from gpu_check import loader_cfg, timed_batches

    mode = ctx["mode"]
    rows = {}
    if mode == "gpu":
        sets = [(c, s) for c in ("h264", "vp9") for s in (128, 256)]
        batch, batches, workers = 32, 2, os.cpu_count() or 1      # + 1 warm-up batch: 288 clips per backend
    else:
        sets, batch, batches, workers = [("vp9", None)], 4, 2, 1
    for codec, side in sets:
        shards = ctx["decode_shards"][(codec, side)]
        res = {}
        for backend, (dev, dec) in {"dali_" + ("mixed" if mode == "gpu" else "cpu"): ("gpu" if mode == "gpu" else
                                    "cpu", "dali"), "cpu": ("cpu", "auto" if mode == "gpu" else "pyav")}.items():
            cfg = loader_cfg(dev, dec, workers if dev == "cpu" else min(4, workers),
                             112 if mode == "gpu" else ctx["smoke_crop"])
            cfg.data.batch_size, cfg.data.shuffle_buffer = batch, batch
            _, rate = timed_batches(cfg, shards, batches)
            res[backend] = rate
        rows[f"{codec}-{side or 'test'}"] = res
    step = ctx["results"].get("step") or {}
    need = (step.get("trainer") or {}).get("clips_per_s")
    best = {k: max(v.values()) for k, v in rows.items()}
    keeps = {k: (v >= need if need else None) for k, v in best.items()}
    shown = "; ".join(f"{k}: " + ", ".join(f"{b} {r:.0f}" for b, r in v.items()) for k, v in rows.items())
    return {"clips_per_s": rows, "step_clips_per_s": need, "keeps_up": keeps, "workers_cpu": workers,
            "batch": batch, "summary": f"clips/s {shown}; the step needs "
                                       + (f"{need:.0f}: keeps up {keeps}" if need else "? (step stage missing)")}


def stage_kernels(ctx: dict) -> dict:
    from gpu_check import check_bank, check_correlation

    if ctx["mode"] == "gpu":
        rows = [check_bank("cuda", K, "bf16") for K in (131072, 1048576)] + [check_correlation("cuda")]
    else:
        rows = [check_bank("cpu", 700, "bf16", B=8, d=32, repeats=1), check_correlation("cpu", N=2, C=8, S=8,
                                                                                    radius=2, repeats=1)]
    if not all(r["ok"] for r in rows):
        raise RuntimeError("a kernel disagrees with its PyTorch reference: "
                           + "; ".join(f"{r['check']}: {r['note']}" for r in rows if not r["ok"]))
    return {"rows": rows, "summary": "; ".join(f"{r['check'].split(' fwd')[0]}: {r['measured']} vs {r['reference']}"
                                               for r in rows)}


def stage_ablation(ctx: dict) -> dict:
    return {"status": "not run",
            "summary": "not run: the motion benchmark's random / NCE / MCL arms at 112 px, batch 64, ~3 min of "
                       "pretraining each plus kNN and linear evaluation, need ~12 min on their own, more than "
                       "this command's 9-minute budget beside the other stages, and benchmarks/motion_ablation.py "
                       "has not been run at that size on a GPU; run it separately"}


FUNCS = {"step": stage_step, "memory": stage_memory, "decode": stage_decode, "kernels": stage_kernels,
         "ablation": stage_ablation}


# ------------------------------------------------------------------------------------------ main
def run_stage(name: str, ctx: dict) -> dict:
    from mohico.utils import atomic_write_json

    print(f"[gpu-proof] {name} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        res = {"status": "ok", **FUNCS[name](ctx)}
    except Exception as e:  # noqa: BLE001 - a failing stage is a row, the others still run
        traceback.print_exc()
        res = {"status": "error", "summary": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    res.update({"stage": name, "mode": ctx["mode"], "seconds": time.perf_counter() - t})
    atomic_write_json(ctx["out"] / f"{name}.json", res)
    ctx["results"][name] = res
    return res


def table(results: list[dict], title: str) -> str:
    lines = [title, "", "| stage | result | seconds | measured |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['summary']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/mohico-gpu-proof", help="each stage's JSON and table.md")
    ap.add_argument("--work", default=None, help="shards and runs (default: OUT/work)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (automatic without a GPU)")
    ap.add_argument("--only", default=",".join(STAGES), help="comma-separated stages")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (the trainer runs twice as many)")
    ap.add_argument("--shards", default=None, help="smoke: an existing shard folder (else synthesised)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds: a stage not started by then is written as not run (the 9-minute budget)")
    args = ap.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    mode = "gpu" if gpu else "smoke"
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        print("[gpu-proof] " + ("--smoke" if args.smoke else "no CUDA GPU on this machine "
              "(torch.cuda.is_available() is False)") + ": every stage at toy size on the CPU; these are not "
              "GPU numbers. Run `make gpu-proof` on a GPU node.", flush=True)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    only = [s for s in STAGES if s in set(args.only.split(","))]
    t0 = time.perf_counter()
    ctx = {"mode": mode, "out": out, "work": work, "results": {}, "steps": args.steps or (10 if gpu else 3)}
    cores = os.cpu_count() or 1
    if gpu:
        ctx["decode_shards"] = {(c, s): make_shards(work, c, s, videos=48, seconds=5.0, workers=cores)
                                for c in ("h264", "vp9") for s in (128, 256)} if "decode" in only else {}
        ctx["step_shards"] = make_shards(work, "h264", 256, videos=48, seconds=5.0, workers=cores)
    else:
        shards = Path(args.shards) if args.shards else make_shards(work, "vp9", 112, videos=4, seconds=4.0)
        ctx["step_shards"], ctx["decode_shards"], ctx["smoke_crop"] = shards, {("vp9", None): shards}, 96
    print(f"[gpu-proof] shards ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    results = []
    for name in only:
        if time.perf_counter() - t0 > args.budget:
            from mohico.utils import atomic_write_json

            res = {"stage": name, "mode": mode, "status": "not run", "seconds": 0.0,
                   "summary": f"not run: the time budget ({args.budget:.0f} s) was spent before this stage"}
            atomic_write_json(out / f"{name}.json", res)
            results.append(res)
            continue
        results.append(run_stage(name, ctx))
    where = torch.cuda.get_device_name(0) if gpu else "CPU smoke run (toy sizes, not GPU numbers)"
    text = table(results, f"gpu-proof on {where}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    from mohico.utils import atomic_write_text

    atomic_write_text(out / "table.md", text)
    print("\n" + text)
    failed = [r["stage"] for r in results if r["status"] == "error"]
    print(f"[gpu-proof] {len(results) - len(failed)}/{len(results)} stages without error"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; JSON in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
