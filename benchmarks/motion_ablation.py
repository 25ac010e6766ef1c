"""The motion-benchmark ablation (issue 13 item 5): does motion focus pay off when appearance is a distractor?

Makes the motion benchmark (`mohico synth --task motion`: label = how objects move; one random
scene per video, new random objects at every cut, still stretches between motions) as labelled train / test shards, pretrains
configs/motion_bench_cpu.yaml's thin R3D-18 on the train shards (labels unused) in each arm with
the same budget and seeds, and evaluates every backbone (and the random init of each seed) on
frozen features with kNN, retrieval and the linear probe (`mohico.eval.protocols`):

    random      no pretraining (the seed's random init)
    nce         MoCo-style NCE with a memory bank, random clips, random resized crops (no MAL)
    nce+ts      + MCL's motion-focused temporal sampling
    nce+ts+sc   + MCL's motion-focused spatial crop
    mcl         + the motion alignment loss (full MCL, MCL Table 1's last row)
                (these four with the pool draw, sampling.mcl_temporal=pool: mohico before 2026-12-06)
    mcl-halves  mcl with the official code's temporal draw (query and key from different halves):
                the config as shipped
    mcl-halves-ocrop  mcl-halves with the released code's spatial crop (sampling.crop_rule=official: the top
                cells of a 7 x 7 grid) instead of the percentile rule; everything else equal
    mcl-official, -adamw, -noaug, -inbatch, sanity-loader...: one component changed at a time
                (ARMS; benchmarks/reports/2026-12-06-mcl-positive-pairs.md)
    sanity      in-batch NT-Xent on two different moving clips of a video (the ground truth's),
                AdamW, on the fixed eval clips: the floor at this budget (motion_sanity.py)
    hico        HiCo alone (visual + topical consistency, gradual sampling)
    mcl+hico    both objectives

Each run dir gets recipe.json (its resolved config, seed, steps, eval clips and pretraining videos;
a run dir made by another recipe is refused, never reused) and, per test set, eval-test{N}.json and
features-test{N}.npz (a run is trained once and scored on every test set it is asked for); the table
(mean +- sample std over seeds) is printed and written to WORK/summary.json. Re-running skips finished runs and evaluations (resumable); a run killed mid
way resumes from its last checkpoint.

    .venv/bin/python benchmarks/motion_ablation.py [--work /tmp/mohico-motion-v2] [--seeds 0 1 2]
        [--arms random nce ...] [--steps 300] [--train-videos 200] [--test-videos 500] [--size 128] [--jobs 1]
        [--motion-style video|shot]
        [--set key=value ...] [--table]

500 test videos (the default since 2026-11-26; 100 before): one backbone's top-1 on N test videos
carries a binomial noise of about sqrt(p (1 - p) / N), +-5 points at 100 and +-2.2 at 500, and at
100 it was as large as the effects the ablation looks for
(benchmarks/reports/2026-11-26-motion-benchmark-500-test-videos.md).

A work dir holds one benchmark version at one size (checked: another is refused). On 2 idle
cores a run takes ~3.5 min and an evaluation ~20 s; ``--jobs 1`` keeps the runs from slowing
each other (``--jobs`` > the free cores only stretches every run).

Before reading the table, check the geometry with ``benchmarks/motion_diagnostics.py`` on the
same work dir: ``upper`` (the backbone trained *supervised* on the labels at this clip geometry and
budget) bounds what any arm can reach; ``flow`` shows whether the clips carry the motion at all;
``features`` whether pretraining moved the backbone and towards what. On RGB clips (v2 benchmark,
64 px crops) the supervised upper bound of this R3D-18 is at chance while flow statistics reach
74% (benchmarks/reports/2026-11-26-motion-benchmark-v2.md); the config therefore feeds the
backbone residual frames (``model.backbone_options.input: residual``), on which the same net learns
the labels supervised and its random init is already well above chance
(benchmarks/reports/2026-11-26-motion-benchmark-residual-input.md): the bar every arm has to clear.
``upper --input diff`` is the supervised bound there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "motion_bench_cpu.yaml"
NO_MAL = "objectives.mcl.mal_enabled=false"
POOL = "sampling.mcl_temporal=pool"   # query and key from one pool, with replacement (mohico before 2026-12-06)
HALVES = "sampling.mcl_temporal=halves"   # the official draw: query and key from different halves
ADAMW = ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.0001"]
FLIP_ONLY = ["data.augment.color_jitter_prob=0.0", "data.augment.grayscale_prob=0.0", "data.augment.blur_prob=0.0"]
IN_BATCH = ["objectives.mcl.negatives=batch", "bank.size=0"]   # SimCLR's NT-Xent: no bank, no EMA keys
ARMS: dict[str, list[str] | None] = {
    "random": None,
    "nce": [NO_MAL, "sampling.motion_prob=0.0", "sampling.motion_crop=false", POOL],
    "nce+ts": [NO_MAL, "sampling.motion_crop=false", POOL],
    "nce+ts+sc": [NO_MAL, POOL],
    "mcl": [POOL],
    "mcl-halves": ["sampling.mcl_temporal=halves"],
    "mcl-halves-ocrop": [HALVES, "sampling.crop_rule=official"],   # mcl-halves with the official code's crop rule
    "mcl-official": ["sampling.mcl_temporal=halves", "objectives.mcl.variant=official"],
    "nce-halves": [NO_MAL, "sampling.motion_prob=0.0", "sampling.motion_crop=false", "sampling.mcl_temporal=halves"],
    # MCL's Table 1 rows on the official draw: + motion-focused temporal sampling, + spatial cropping
    "nce-halves+ts": [NO_MAL, "sampling.motion_crop=false", HALVES],
    "nce-halves+ts+sc": [NO_MAL, HALVES],
    "mcl-halves-adamw": [HALVES, *ADAMW],
    "mcl-official-adamw": [HALVES, "objectives.mcl.variant=official", *ADAMW],
    "mcl-halves-noaug": [HALVES, *FLIP_ONLY],
    "mcl-halves-inbatch": [HALVES, *IN_BATCH],
    # the sanity recipe through the real loader, then one MCL component swapped in at a time
    "sanity-loader": [HALVES, *IN_BATCH, NO_MAL, *ADAMW, *FLIP_ONLY],
    "sanity-loader+aug": [HALVES, *IN_BATCH, NO_MAL, *ADAMW],
    "sanity-loader+aug+bank": [HALVES, NO_MAL, *ADAMW],
    "sanity": [],                  # not `mohico train`: motion_sanity.train_sanity on the eval clips
    "hico": ["objectives.mcl.weight=0.0", "objectives.hico.weight=1.0"],
    "mcl+hico": ["objectives.hico.weight=1.0"],
}
EVAL_VERSION = 3   # 2 (2026-11-26): the linear probe's search by 5-fold cross-validation, wd grid 0-0.1
#                   3 (2026-12-06): retrieval centred per set (CoCLR), kNN top-5 only over voted classes


def eval_name(test_videos: int) -> str:
    """A run's scores on the ``test_videos`` test set (``features_name``: its clip features)."""
    return f"eval-test{test_videos}.json"


def features_name(test_videos: int) -> str:
    return f"features-test{test_videos}.npz"


def current_scores(path: Path) -> dict | None:
    """The scores in ``path`` if the current protocols (``EVAL_VERSION``) made them, else None: a
    run scored by an older protocol is rescored, never mixed into the table."""
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    return res if res.get("eval_version") == EVAL_VERSION else None


METRICS = (("knn", "top1"), ("retrieval", "recall@1"), ("retrieval", "recall@5"), ("linear", "top1"))


def make_data(work: Path, train_videos: int, test_videos: int, size: int, workers: int,
              motion_style: str = "video") -> tuple[Path, Path]:
    """Labelled train / test shards of the motion benchmark: videos 0..N-1 and N..N+M-1 of seed 1,
    with one motion style per ``motion_style`` (``"video"`` or ``"shot"``)."""
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize

    out = []
    for split, n, first in (("train", train_videos, 0), ("test", test_videos, train_videos)):
        videos, shards = work / f"videos-{split}-{n}", work / f"shards-{split}-{n}"
        check_videos(videos, size, motion_style)
        if not (shards / "manifest.json").exists() or not json.loads((shards / "manifest.json").read_text()).get(
                "complete"):
            if not (videos / "labels.json").exists():
                synthesize(videos, videos=n, seed=1, size=(size, size), duration=8.0, workers=workers, task="motion",
                           first=first, motion_style=motion_style)
            write_shards(videos, shards, short_side=size, workers=workers, labels=videos / "labels.json")
        out.append(shards)
    return out[0], out[1]


def check_videos(videos: Path, size: int, motion_style: str = "video") -> None:
    """Refuse a work dir whose videos another benchmark version, size or motion style made (the
    run would silently evaluate other data): names the dir and the fix."""
    from mohico.datasets.synthetic.synth_motion import VERSION

    first = next(iter(sorted(videos.glob("video_*.json"))), None) if videos.is_dir() else None
    if first is None:
        return
    gt = json.loads(first.read_text())
    version, side = gt.get("generator", {}).get("version"), min(gt.get("width", 0), gt.get("height", 0))
    style = gt.get("style_per", "video")               # videos written before the option: one style per video
    if version != VERSION or side != size or style != motion_style:
        raise SystemExit(f"{videos}: videos of motion benchmark version {version} at {side} px with one motion "
                         f"style per {style}, but this run wants version {VERSION} at {size} px per {motion_style}; "
                         "pass another --work (or delete that dir)")


def run_recipe(arm: str, seed: int, args) -> dict:
    """What makes a run's numbers: the arm's resolved config (CONFIG + the arm's overrides + ``--set``,
    less the paths), its seed, pretraining steps, eval clips per video and the train videos (pretraining
    data and the eval's labelled set). Not the test set: each has its own evaluation file."""
    from mohico.config import load_config, to_dict

    cfg = to_dict(load_config(CONFIG, [*(ARMS[arm] or []), *args.set, f"trainer.seed={seed}"]))
    cfg["run"].pop("dir", None)
    cfg["data"].pop("shards", None)
    steps = args.steps if ARMS[arm] is not None else 0
    return json.loads(json.dumps({"arm": arm, "seed": seed, "steps": steps, "clips": args.clips,
                                  "train_videos": args.train_videos, "config": cfg}))


def check_run(run: Path, recipe: dict, write: bool = True) -> None:
    """Refuse a run dir made by another recipe (another config, --set, seed, steps or clips: its
    finished train/eval would silently stand in for this one's), naming the keys that differ and
    the fix; record ``recipe`` in ``run/recipe.json`` for a new run (``write``)."""
    path = run / "recipe.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != recipe:
            from mohico.trainer.checkpoint.config_check import config_difference

            diff = config_difference(old, recipe)
            raise SystemExit(f"{run}: made by another recipe ({'; '.join(diff[:6])}); "
                             "pass another --work, or delete that run dir to redo it")
        return
    if any((run / f).exists() for f in ("train_done.json", "eval.json", "checkpoints")) or any(run.glob("eval-test*.json")):
        raise SystemExit(f"{run}: a run without recipe.json (an older motion_ablation.py made it), so what "
                         "made it is unknown; pass another --work, or delete that run dir to redo it")
    if write:
        from mohico.utils import atomic_write_json

        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, recipe)


def train(run: Path, overrides: list[str], seed: int, train_shards: Path, steps: int, extra: list[str]) -> float:
    """Pretrain one arm/seed into ``run`` (skipped when finished); returns the wall seconds spent."""
    done = run / "train_done.json"
    if done.exists():
        return json.loads(done.read_text())["seconds"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mohico", "train", str(CONFIG), "--nproc", "1", f"run.dir={run}",
           f"data.shards={train_shards}", f"trainer.seed={seed}", f"trainer.max_steps={steps}",
           f"checkpoint.every_steps={max(steps // 3, 1)}", *overrides, *extra]
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run / "train.log", "a") as log:
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": seconds, "cmd": cmd}))
    return seconds


def train_sanity_run(run: Path, seed: int, args, train_shards: Path) -> float:
    """The sanity arm of one seed into ``run/backbone.pt`` (skipped when finished), in a child
    process with one thread like the trained arms; returns the wall seconds spent."""
    done = run / "train_done.json"
    if not done.exists():
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, __file__, "--_sanity", str(run), str(seed), str(train_shards),
                        str(args.work), str(args.train_videos), str(args.clips), str(args.steps),
                        *[f"--set={s}" for s in args.set]], env=env, check=True)
    return json.loads(done.read_text())["seconds"]


def sanity_main(run, seed, train_shards, work, train_videos, clips, steps, extra) -> None:
    """``--_sanity``: train the sanity arm (motion_sanity.train_sanity) and record it."""
    import torch

    from motion_sanity import train_sanity
    from mohico.config import load_config
    from mohico.utils import atomic_write_json

    torch.set_num_threads(1)
    cfg = load_config(CONFIG, [f"trainer.seed={seed}", *extra])
    videos = eval_clips(Path(train_shards), cfg, int(clips))
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    log = train_sanity(run / "backbone.pt", videos, Path(work) / f"videos-train-{train_videos}", cfg, int(seed), int(steps))
    atomic_write_json(run / "train_done.json", {"seconds": log["seconds"], "log": log})


def eval_clips(shards: Path, cfg, clips: int) -> list:
    """The deterministic eval clips of every video of ``shards`` (``LabelledVideo`` list), decoded
    once and kept beside the shards: every backbone of the ablation embeds the same clips. The cache
    holds plain arrays and strings (``numpy.savez``), not pickled classes, so it outlives a move of
    the class that holds them (a pickle of ``mohico.trainer.knn_eval.LabelledVideo`` did not)."""
    import numpy as np

    from mohico.datasets.load.eval_clips import LabelledVideo, iter_labelled

    d = cfg.data
    path = shards.parent / f"{shards.name}.evalclips-{clips}x{d.clip_len}x{d.frame_stride}x{d.crop_size}.npz"
    if not path.exists():
        videos = list(iter_labelled(str(shards), d, clips, where=str(shards)))
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=np.array([v.key for v in videos]), labels=np.array([str(v.label) for v in videos]),
                 sources=np.array([v.source for v in videos]), clips=np.stack([v.clips for v in videos]))
        os.replace(tmp, path)
    with np.load(path, allow_pickle=False) as z:
        return [LabelledVideo(str(k), str(lab), c, str(src))
                for k, lab, src, c in zip(z["keys"], z["labels"], z["sources"], z["clips"])]


def saved_feature_sets(saved, feats: dict | None = None) -> tuple:
    """``(train, test)`` FeatureSets of a saved ``features-test{N}.npz`` (``feats``: other features
    ``{"train": (N, D), "test": (M, D)}`` of the same videos, in its order)."""
    from mohico.eval.features import FeatureSet

    feats = feats or {s: saved[s] for s in ("train", "test")}
    return tuple(FeatureSet(list(map(str, saved[f"{s}_keys"])), list(map(str, saved[f"{s}_sources"])),
                            list(map(str, saved[f"{s}_labels"])), feats[s]) for s in ("train", "test"))


def evaluate(run: Path, ckpt: str, seed: int, train_shards: Path, test_shards: Path, clips: int, test_videos: int,
             extra: list[str]) -> dict:
    """kNN, retrieval and linear probe of one backbone on frozen features; cached in
    ``run/eval-test{test_videos}.json`` (features in ``run/features-test{test_videos}.npz``)."""
    import torch

    from mohico.config import load_config
    from mohico.eval import protocols as ep
    from mohico.eval.features import embed_views
    from mohico.eval.knn import load_eval_backbone
    from mohico.utils import atomic_write_json

    import numpy as np

    out = run / eval_name(test_videos)
    if (res := current_scores(out)) is not None:
        return res
    torch.set_num_threads(1)
    feats = run / features_name(test_videos)
    saved = np.load(feats) if feats.exists() else None
    if saved is not None and "train_keys" in saved:   # the same run's clip features (a run is never retrained)
        tr, te = saved_feature_sets(saved)
    else:
        config = run / "config.yaml" if (run / "config.yaml").exists() else CONFIG   # random, sanity: CONFIG
        cfg = load_config(config, [f"trainer.seed={seed}", *extra] if config == CONFIG else [])
        backbone = load_eval_backbone(ckpt, cfg, config)
        cpu = torch.device("cpu")
        tr = embed_views(backbone, eval_clips(train_shards, cfg, clips), cpu).labelled("train shards")
        te = embed_views(backbone, eval_clips(test_shards, cfg, clips), cpu).labelled("test shards")
        run.mkdir(parents=True, exist_ok=True)
        tmp = feats.with_name(f".{feats.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{f"{s}{k}": np.array(v) for s, fs in (("train", tr), ("test", te))
                         for k, v in (("", fs.feats), ("_keys", fs.keys), ("_sources", fs.sources),
                                      ("_labels", fs.labels))})
        os.replace(tmp, feats)
    res = {"eval_version": EVAL_VERSION, "knn": ep.knn(tr, te), "retrieval": ep.retrieval(tr, te),
           "linear": ep.linear(tr, te, seed=seed)}
    for r in res.values():
        if isinstance(r, dict):
            r.pop("per_video", None)
    atomic_write_json(out, res)
    return res


def job(arm: str, seed: int, args, train_shards: Path, test_shards: Path) -> dict:
    run = Path(args.work) / "runs" / f"{arm}-s{seed}"
    check_run(run, run_recipe(arm, seed, args))
    seconds = 0.0
    if ARMS[arm] is None:
        ckpt = "random"
    elif arm == "sanity":
        seconds = train_sanity_run(run, seed, args, train_shards)
        ckpt = str(run / "backbone.pt")
    else:
        seconds = train(run, ARMS[arm], seed, train_shards, args.steps, args.set)
        ckpt = str(run)
    # evaluate in a child process: a fresh interpreter per job keeps the parallel jobs' torch state apart
    scores = run / eval_name(args.test_videos)
    if current_scores(scores) is None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, __file__, "--_eval", str(run), ckpt, str(seed), str(train_shards),
                        str(test_shards), str(args.clips), str(args.test_videos), *[f"--set={s}" for s in args.set]],
                       env=env, check=True)
    res = current_scores(scores)
    print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: train {seconds:.0f} s, "
          + ", ".join(f"{p} {m} {res[p][m]:.3f}" for p, m in METRICS), flush=True)
    return {"arm": arm, "seed": seed, "train_seconds": seconds, **{f"{p}/{m}": res[p][m] for p, m in METRICS}}


def table(rows: list[dict]) -> str:
    head = "| arm | seeds | " + " | ".join(f"{p} {m}" for p, m in METRICS) + " | train s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue

        def cell(key):
            v = [100 * r[key] for r in rs]
            return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

        secs = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cell(f"{p}/{m}") for p, m in METRICS)
                     + f" | {secs:.0f} |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    """Each trained arm minus the random init of the same seed (every arm of a seed starts from that
    init), mean +- sample std over the seeds with the per-seed differences: the seed-to-seed spread
    of the init itself cancels out."""
    rand = {r["seed"]: r for r in rows if r["arm"] == "random"}
    lines = ["| arm | seeds | " + " | ".join(f"{p} {m} - random" for p, m in METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm and arm != "random" and r["seed"] in rand]
        if not rs:
            continue
        cells = []
        for p, m in METRICS:
            d = [100 * (r[f"{p}/{m}"] - rand[r["seed"]][f"{p}/{m}"]) for r in rs]
            spread = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
            cells.append(f"{statistics.mean(d):+.1f}{spread} ({', '.join(f'{x:+.1f}' for x in d)})")
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_sanity":
        sanity_main(*sys.argv[2:9], [a.split("=", 1)[1] for a in sys.argv[9:]])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--_eval":
        run, ckpt, seed, tr, te, clips, test_videos = sys.argv[2:9]
        extra = [a.split("=", 1)[1] for a in sys.argv[9:]]
        evaluate(Path(run), ckpt, int(seed), Path(tr), Path(te), int(clips), int(test_videos), extra)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mohico-motion-v2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per run (same for every arm)")
    ap.add_argument("--train-videos", type=int, default=200)
    ap.add_argument("--test-videos", type=int, default=500, help="videos of the test set (binomial noise ~2 points at 500)")
    ap.add_argument("--size", type=int, default=128, help="video side in pixels (the config's 64 px crops need >= 108)")
    ap.add_argument("--clips", type=int, default=4, help="eval clips per video")
    ap.add_argument("--motion-style", choices=["video", "shot"], default="video",
                    help="the benchmark's motion style (speed, amplitude, ...): one per video, kept across its shots "
                         "(default), or a new one at every cut (`mohico synth --motion-style`)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained/evaluated at once")
    ap.add_argument("--set", action="append", default=[], metavar="key=value",
                    help="config override for every arm (e.g. model.backbone_options.width=4)")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs already evaluated")
    args = ap.parse_args()

    work = Path(args.work)
    if args.table:
        rows, stale = [], []
        for arm in ARMS:
            for seed in args.seeds:
                run = work / "runs" / f"{arm}-s{seed}"
                scores = run / eval_name(args.test_videos)
                if (res := current_scores(scores)) is None:
                    if scores.exists():
                        stale.append(run.name)
                else:
                    check_run(run, run_recipe(arm, seed, args), write=False)
                    secs = json.loads((run / "train_done.json").read_text())["seconds"] if ARMS[arm] is not None else 0.0
                    rows.append({"arm": arm, "seed": seed, "train_seconds": secs,
                                 **{f"{p}/{m}": res[p][m] for p, m in METRICS}})
        print(table(rows))
        print("\npaired with the random init of the same seed (points):\n" + paired_table(rows))
        if stale:
            print(f"left out, scored by an older evaluation protocol: {', '.join(stale)}; "
                  "run the same command without --table to rescore them (their training is reused)")
        from mohico.config import load_config

        cfg = load_config(CONFIG, args.set)
        videos = (work / f"videos-train-{args.train_videos}", work / f"videos-test-{args.test_videos}")
        if missing := [str(v) for v in videos if not v.is_dir()]:
            print(f"\nno motion probe: {', '.join(missing)} missing (the probe reads each clip's ground truth "
                  "there; the videos the ablation made, kept in --work)")
            return
        from motion_probe import motion_probe

        print("\nmotion probe on the saved clip features (%): kNN of moving clips | of still clips | "
              "moving-vs-still kNN | its majority baseline")
        for r in rows:
            run = work / "runs" / f"{r['arm']}-s{r['seed']}"
            if (run / features_name(args.test_videos)).exists():
                p = motion_probe(run / features_name(args.test_videos), videos, cfg, args.clips)
                print(f"{r['arm']:>10} s{r['seed']}: " + " | ".join(f"{100 * v:.1f}" for v in p.values()))
        return
    work.mkdir(parents=True, exist_ok=True)
    train_shards, test_shards = make_data(work, args.train_videos, args.test_videos, args.size, max(args.jobs, 1),
                                          args.motion_style)
    from mohico.config import load_config

    cfg = load_config(CONFIG, args.set)
    for shards in (train_shards, test_shards):         # decode the eval clips once, before the parallel jobs
        eval_clips(shards, cfg, args.clips)
    first = ("random", "nce", "mcl")       # the comparison that matters finishes first, every seed
    order = [(arm, seed) for arm in first if arm in args.arms for seed in args.seeds] + \
        [(arm, seed) for seed in args.seeds for arm in args.arms if arm not in first]
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        rows = list(pool.map(lambda a: job(*a, args, train_shards, test_shards), order))
    text = table(rows)
    print(f"\nmotion benchmark, {args.train_videos} train / {args.test_videos} test videos, {args.steps} steps, "
          f"seeds {args.seeds}, mean ± std (%):\n{text}")
    from mohico.utils import atomic_write_json

    atomic_write_json(work / "summary.json", {"args": vars(args), "rows": rows, "table": text})


if __name__ == "__main__":
    main()
