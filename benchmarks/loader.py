"""Loader throughput on CPU: this pipeline vs a naive whole-video decoder, 1- and 10-minute videos;
and several samples per read (data.samples_per_read R) side by side: clips/s, bytes read per clip.

    .venv/bin/python benchmarks/loader.py [--work /tmp/mohico-bench-loader] [--workers 1]
        [--batch 4] [--batches 6] [--step-ms 200] [--reads-only] [--read-batches 16]

Makes two synthetic VP9 videos per length (mohico.datasets.synthetic.synth, 160x120, 15 fps) and their
shards (short side 128, GOP 16, DIS motion), cached in --work. Then, side by side in this
process, with the same sampler (MCL + HiCo, V = 3 clips of 16 frames at stride 2, 112 x 112):
  (a) build_loader: DataLoader workers read + sample + remux the clip's GOPs, DALI (CPU) decodes;
  (b) naive: DataLoader workers decode the whole video with PyAV, then slice the clips' frames
      and apply the same crop/resize/augment (pipeline_cpu.transform_clip).
The trainer's step is simulated by sleeping --step-ms per batch (a GPU step costs no CPU), so
data wait = time blocked in next() / wall time. Also a single-process breakdown: remux alone
and DALI decode of the remuxed bytes (per clip), and the worker's whole job for one sample
(parse json + motion maps, sample, remux 3 clips). Prints a Markdown table.

Reads table (``--reads-only`` prints just this one): build_loader at R = 1, 2, 4, 8 and with the
length rule (R <= 8, data.seconds_per_sample = 60: one sample per started minute), each for
--read-batches batches after a warm-up batch: clips/s, data wait, and bytes read from the tars
per clip (the loader's ``stats()["bytes_read"]`` growth over those batches / clips handed out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def make_data(work: Path, minutes: int) -> Path:
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize

    vids, shards = work / f"videos-{minutes}min", work / f"shards-{minutes}min"
    if not (shards / "manifest.json").exists() or not json.loads((shards / "manifest.json").read_text()).get("complete"):
        t = time.perf_counter()
        synthesize(vids, videos=2, seed=7, codec="vp9", fps=15, size=(160, 120), duration=60.0 * minutes, topics=2)
        write_shards(vids, shards, codec="vp9", short_side=128, fps=15, gop=16, max_shard_size=10 ** 10,
                     workers=1, flow="dis", progress=False)
        print(f"made {minutes}-min data in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return shards


def config(args):
    from mohico.config import Config

    cfg = Config()
    cfg.objectives.mcl.weight = cfg.objectives.hico.weight = 1.0
    d = cfg.data
    d.batch_size, d.num_workers, d.clip_len, d.frame_stride, d.crop_size = args.batch, args.workers, 16, 2, 112
    d.shuffle_buffer = 2
    cfg.sampling.crop_area = [0.8, 1.0]   # 112-px crops of short side 128 shards never upsample (the loader checks)
    return cfg


class NaiveDataset(torch.utils.data.IterableDataset):
    """Decode the whole video with PyAV, then slice: what research code often does."""

    def __init__(self, cfg, shards: Path):
        self.cfg, self.urls = cfg, sorted(str(p) for p in shards.glob("*.tar"))

    def __iter__(self):
        import io

        import torch

        from mohico.datasets.load.pipeline_cpu import transform_clip
        from mohico.datasets.load.pipeline_stream import iter_shard
        from mohico.datasets.load.remux import decode_frames
        from mohico.datasets.load.sampling import ClipSampler, sample_rng

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        d = self.cfg.data
        sampler = ClipSampler(self.cfg.sampling, d, True, True)
        epoch, batch = 0, []
        while True:
            for n, s in enumerate(x for u in self.urls for x in iter_shard(u)):
                if n % nw != wid:
                    continue
                meta = json.loads(s["json"])
                motion = np.load(io.BytesIO(s["motion.npy"]))
                draw = sampler.sample(meta, motion, sample_rng(0, epoch, 0, s["__key__"]))
                video = decode_frames(s["webm"], np.arange(meta["num_frames"]))      # the whole video
                clips = [transform_clip(video[draw.frames[v]], draw.boxes[v], draw.augment[v],
                                        d.crop_size, d.mean, d.std) for v in range(draw.frames.shape[0])]
                batch.append(np.stack(clips))
                if len(batch) == d.batch_size:
                    yield torch.from_numpy(np.stack(batch))
                    batch = []
            epoch += 1


def naive_loader(cfg, shards: Path):
    return iter(torch.utils.data.DataLoader(NaiveDataset(cfg, shards), batch_size=None, num_workers=cfg.data.num_workers,
                                            multiprocessing_context="forkserver"))


def run(it, batches: int, step_s: float, clips_per_batch: int, stats=None) -> dict:
    """Time ``batches`` batches after a warm-up one; ``stats``: the loader's, for bytes read per clip."""
    next(it)                                   # warm-up: worker start, first batch
    b0 = stats()["bytes_read"] if stats else 0
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        next(it)
        wait += time.perf_counter() - t
        time.sleep(step_s)
    wall = time.perf_counter() - t0
    clips = batches * clips_per_batch
    return {"clips_s": clips / wall, "wait": wait / wall, "ms_clip": 1000 * wait / clips,
            "bytes_clip": (stats()["bytes_read"] - b0) / clips if stats else float("nan")}


READ_MODES = [(1, 0.0), (2, 0.0), (4, 0.0), (8, 0.0), (8, 60.0)]


def run_reads(cfg, shards: Path, R: int, seconds: float, batches: int, step_s: float, clips_per_batch: int) -> dict:
    """build_loader at samples_per_read=R (seconds_per_sample=seconds): clips/s, wait, bytes/clip."""
    import copy

    from mohico.datasets.load.pipeline import build_loader

    c = copy.deepcopy(cfg)
    c.data.samples_per_read, c.data.seconds_per_sample = R, seconds
    loader = build_loader(c, str(shards))
    out = run(iter(loader), batches, step_s, clips_per_batch, loader.stats)
    loader.close()
    return out


def worker_cpu(cfg, shards: Path, R: int, seconds: float, batches: int) -> dict:
    """The loader worker's job in this process (read the tar, parse, sample, remux; DALI decode,
    unchanged by R, excluded): CPU ms per clip by time.process_time, robust to other jobs' load."""
    import copy

    from mohico.datasets.load.pipeline import build_loader
    from mohico.datasets.load.pipeline_worker import ProgressSchedule, worker_items

    c = copy.deepcopy(cfg)
    c.data.samples_per_read, c.data.seconds_per_sample = R, seconds
    spec = build_loader(c, str(shards)).spec
    items = worker_items(spec, 0, None, 0, 0, ProgressSchedule(64), {})
    next(items)                                # warm-up
    t = time.process_time()
    clips = 0
    for _ in range(batches):
        item = next(items)
        clips += sum(len(s["clips"]) for s in item["samples"])
    return {"cpu_ms_clip": 1000 * (time.process_time() - t) / clips, "bytes": item["counters"]["bytes_read"]}


def breakdown(cfg, shards: Path, n: int = 12) -> dict:
    """Single process: remux one clip's GOPs; DALI-decode those bytes (ms per clip)."""
    from mohico.datasets.load.dali_decode import DaliClipDecoder
    from mohico.datasets.load.pipeline_stream import iter_shard
    from mohico.datasets.load.remux import ClipRemuxer

    s = next(iter_shard(str(sorted(shards.glob("*.tar"))[0])))
    meta = json.loads(s["json"])
    rng = np.random.default_rng(0)
    starts = rng.integers(0, meta["num_frames"] - 31, size=n)
    t = time.perf_counter()
    cuts = []
    with ClipRemuxer(s["webm"], meta["fps"]) as rem:
        for st in starts:
            cuts.append((rem.cut(int(st), int(st) + 30), int(st)))
    remux_ms = 1000 * (time.perf_counter() - t) / n
    aug = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "grayscale": False,
           "blur_sigma": 0.0, "flip": False}
    dec = DaliClipDecoder(4, 112, [0.45] * 3, [0.225] * 3)
    clips = [{"data": c.data, "frames": (np.arange(st, st + 31, 2) - c.key_frame).astype(np.int32),
              "box": (0, 0, 112, 112), "aug": aug} for c, st in cuts]
    dec.decode(clips[:4])
    t = time.perf_counter()
    dec.decode(clips)
    dali_ms = 1000 * (time.perf_counter() - t) / n
    # the worker's whole job for one sample (json + motion parse, sampler, 3 remuxes)
    from mohico.datasets.load.pipeline import build_loader
    from mohico.datasets.load.pipeline_worker import prepare_sample
    from mohico.datasets.load.sampling import ClipSampler
    spec = build_loader(cfg, str(shards)).spec
    sampler = ClipSampler(spec.sampling, spec.data, spec.mcl, spec.hico, spec.views)
    t = time.perf_counter()
    for e in range(n // 2):
        prepare_sample({**s, "__epoch__": e}, spec, sampler, 0.5)
    prep_ms = 1000 * (time.perf_counter() - t) / (n // 2)
    return {"remux_ms": remux_ms, "dali_ms": dali_ms, "video_mb": len(s["webm"]) / 1e6, "prep_ms": prep_ms}


def length_check(cfg, work: Path, args) -> None:
    """clips/s of build_loader at the default R (<= 8, 60 s per sample) for 1- and 10-min videos,
    alternated args.length_check times; the 10/1 ratio per adjacent pair, mean and spread."""
    R, sec = READ_MODES[-1]
    shards = {m: make_data(work, m) for m in (1, 10)}
    pairs = []
    for i in range(args.length_check):
        order = (1, 10) if i % 2 == 0 else (10, 1)          # neither length always runs first
        got = {m: run_reads(cfg, shards[m], R, sec, args.read_batches, args.step_ms / 1000, args.batch * 3)
               for m in order}
        pairs.append(got)
        print(f"pair {i + 1}: 1 min {got[1]['clips_s']:.1f} clips/s ({got[1]['bytes_clip'] / 1e3:.0f} KB/clip), "
              f"10 min {got[10]['clips_s']:.1f} clips/s ({got[10]['bytes_clip'] / 1e3:.0f} KB/clip)", flush=True)
    one = np.array([p[1]["clips_s"] for p in pairs])
    ten = np.array([p[10]["clips_s"] for p in pairs])
    ratio = ten / one
    kb = np.array([p[10]["bytes_clip"] / p[1]["bytes_clip"] for p in pairs])
    print(f"\nDefault R (<= {R}, {sec:.0f} s/sample), {args.length_check} alternated pairs, {args.read_batches} "
          f"batches of {args.batch} videos x 3 clips each, {args.workers} worker(s), simulated step {args.step_ms:.0f} ms\n")
    print("| video | clips/s mean | clips/s std | KB read/clip |")
    print("|---|---|---|---|")
    for m, v in ((1, one), (10, ten)):
        print(f"| {m} min | {v.mean():.1f} | {v.std(ddof=1) if len(v) > 1 else 0:.1f} | "
              f"{np.mean([p[m]['bytes_clip'] for p in pairs]) / 1e3:.0f} |")
    print(f"\nclips/s 10 min / 1 min per pair: {' '.join(f'{r:.2f}' for r in ratio)} (mean {ratio.mean():.2f}); "
          f"KB/clip 10 min / 1 min: {kb.mean():.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mohico-bench-loader")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--naive-batches", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=200.0)
    ap.add_argument("--reads-only", action="store_true", help="only the samples-per-read table")
    ap.add_argument("--read-batches", type=int, default=16)
    ap.add_argument("--length-check", type=int, default=0, metavar="N",
                    help="only clips/s at the default R, 1- and 10-min videos alternated N times (pairs adjacent "
                         "in time, so a drifting load hits both lengths alike): mean, spread and 10/1 ratio")
    ap.add_argument("--worker-cpu", action="store_true",
                    help="only the worker's CPU ms per clip (read + parse + sample + remux) per R, in this process")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mohico.datasets.load.pipeline import build_loader

    work = Path(args.work)
    cfg = config(args)
    V = 3
    if args.worker_cpu:
        print(f"\nWorker CPU per clip (read + parse + sample + remux, no decode), {args.read_batches} batches of "
              f"{args.batch} videos x {V} clips, after a warm-up batch; time.process_time\n")
        print("| R | 1 min CPU ms/clip | 10 min CPU ms/clip |")
        print("|---|---|---|")
        for R, sec in READ_MODES:
            got = [worker_cpu(cfg, make_data(work, m), R, sec, args.read_batches) for m in (1, 10)]
            name = f"{R}" if not sec else f"<= {R}, {sec:.0f} s/sample"
            print(f"| {name} | {got[0]['cpu_ms_clip']:.1f} | {got[1]['cpu_ms_clip']:.1f} |")
        return
    if args.length_check:
        length_check(cfg, work, args)
        return
    reads = {}
    for minutes in (1, 10):
        shards = make_data(work, minutes)
        for R, sec in READ_MODES:
            reads[(minutes, R, sec)] = run_reads(cfg, shards, R, sec, args.read_batches, args.step_ms / 1000,
                                                 args.batch * V)
    print(f"\nSamples per read: CPU, {os.cpu_count()} cores, loader workers {args.workers}, batch {args.batch} "
          f"videos x {V} clips, {args.read_batches} batches after warm-up, simulated step {args.step_ms:.0f} ms, "
          f"shuffle buffer {cfg.data.shuffle_buffer}\n")
    print("| R | 1 min clips/s | 1 min data wait | 1 min KB read/clip | 10 min clips/s | 10 min data wait "
          "| 10 min KB read/clip | KB/clip 10 min / 1 min |")
    print("|---|---|---|---|---|---|---|---|")
    for R, sec in READ_MODES:
        a, b = reads[(1, R, sec)], reads[(10, R, sec)]
        name = f"{R}" if not sec else f"<= {R}, {sec:.0f} s/sample"
        print(f"| {name} | {a['clips_s']:.1f} | {a['wait']:.0%} | {a['bytes_clip'] / 1e3:.0f} | {b['clips_s']:.1f} "
              f"| {b['wait']:.0%} | {b['bytes_clip'] / 1e3:.0f} | {b['bytes_clip'] / max(a['bytes_clip'], 1):.2f} |")
    if args.reads_only:
        return
    rows = []
    for minutes in (1, 10):
        shards = make_data(work, minutes)
        bd = breakdown(cfg, shards)
        loader = build_loader(cfg, str(shards))
        a = run(iter(loader), args.batches, args.step_ms / 1000, args.batch * V)
        loader.close()
        b = run(naive_loader(cfg, shards), args.naive_batches, args.step_ms / 1000, args.batch * V)
        rows.append((minutes, bd, a, b))
    print(f"\nCPU, {os.cpu_count()} cores, loader workers {args.workers}, batch {args.batch} videos x {V} clips "
          f"(16 frames, stride 2, 112x112), simulated step {args.step_ms:.0f} ms\n")
    print("| video | (a) clips/s | (a) data wait | (b) naive clips/s | (b) data wait | speed-up a/b "
          "| remux ms/clip | DALI decode ms/clip | worker ms/sample (V=3) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for minutes, bd, a, b in rows:
        print(f"| {minutes} min ({bd['video_mb']:.1f} MB) | {a['clips_s']:.1f} | {a['wait']:.0%} | {b['clips_s']:.2f} "
              f"| {b['wait']:.0%} | {a['clips_s'] / b['clips_s']:.0f}x | {bd['remux_ms']:.1f} | {bd['dali_ms']:.1f} "
              f"| {bd['prep_ms']:.1f} |")
    (m1, bd1, a1, _), (m10, bd10, a10, _) = rows
    print(f"\n(a) cost per clip 10 min / 1 min: {a1['clips_s'] / a10['clips_s']:.2f}x (clips/s ratio), "
          f"remux {bd10['remux_ms'] / bd1['remux_ms']:.2f}x, DALI {bd10['dali_ms'] / bd1['dali_ms']:.2f}x, "
          f"worker per sample {bd10['prep_ms'] / bd1['prep_ms']:.2f}x")


if __name__ == "__main__":
    main()
