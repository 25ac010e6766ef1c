"""MCL motion-crop scale: the area distribution of `motion_crop_box` (the percentile rule), before vs after
its sizes were tried in the order drawn.

Before (commit c7978db and earlier): the random sizes were sorted smallest first, so the box was
almost always the smallest size that reached the coverage. After: sizes in the order drawn, the
first box reaching the coverage, else the best-coverage box seen (as MCL's official code orders them;
its full rule is `crop_rule: official`, `mohico.datasets.load.crops.official_crop_box`). Both run
side by side in one process on the same maps with the same seeds; "before" is the function as it
was at ``--before`` (read from git history, so the comparison stays reproducible).

Maps:
- ``blob 28x28``: a random rectangular blob (3-13 cells a side) on a flat or noisy background, as
  in tests/test_sampling.py;
- ``blob 7x7``: the official code's 7x7 grid, a random 1-3 cell blob plus noise;
- ``synthetic clips``: S-motion maps (mean over a clip of 16 frames at stride 2) of the shards
  of ``mohico synth`` videos (written here with the default shard options, DIS flow), every 8th
  start of every video.

Reported per map set and rule: area as a fraction of the map (mean, quartiles), the fraction of
boxes at the smallest allowed area (< min + 0.05), the coverage of the hot cells the box reaches,
and the fraction of boxes that reach the required coverage.

    .venv/bin/python benchmarks/crop_area.py
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def function_at(rev: str, path: str, name: str):
    """``name`` from ``path`` as it was at git revision ``rev`` (imports resolved at that file)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType(f"_at_{rev}")
    sys.modules[mod.__name__] = mod          # dataclasses look their module up
    exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
    return getattr(mod, name)


def blob_maps(n: int, seed: int, size: int, sides: tuple[int, int], noise) -> list[np.ndarray]:
    """``n`` maps ``size x size``: one random rectangular blob (sides in ``[sides[0], sides[1])``)
    of 1.0 on a background of ``noise`` x U(0, 1) (``noise``: a float, or None for every other map
    flat and the rest at 0.02)."""
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        level = (0.02 if i % 2 else 0.0) if noise is None else noise
        m = level * r.random((size, size))
        bw, bh = int(r.integers(*sides)), int(r.integers(*sides))
        x, y = int(r.integers(0, size - bw + 1)), int(r.integers(0, size - bh + 1))
        m[y:y + bh, x:x + bw] += 1.0
        out.append(m)
    return out


def synth_clip_maps(videos: int, workdir: Path) -> list[np.ndarray]:
    import io
    import json

    from mohico.datasets.load.pipeline_stream import iter_shard
    from mohico.datasets.write.shards import write_shards
    from mohico.datasets.synthetic.synth import synthesize

    synthesize(workdir / "videos", videos=videos, seed=7, fps=15, size=(160, 120), duration=8.0, topics=2)
    write_shards(workdir / "videos", workdir / "shards", short_side=112, fps=15, workers=1, progress=False)
    out = []
    for tar in sorted((workdir / "shards").glob("*.tar")):
        for s in iter_shard(str(tar)):
            meta = json.loads(s["json"])
            maps = np.load(io.BytesIO(s["motion.npy"])).astype(np.float64) * meta["motion"]["scale"] / 255.0
            for s0 in range(0, maps.shape[0] - 31, 8):
                sm = maps[s0:s0 + 31:2].mean(axis=0)
                if sm.max() > 0:
                    out.append(sm)
    return out


def measure(fn, maps, seeds: int, area, coverage: float) -> dict:
    from mohico.datasets.load.crops import box_coverage, hot_mask

    areas, covs, kinds = [], [], []
    for i, m in enumerate(maps):
        hot = hot_mask(m, 90.0)
        for s in range(seeds):
            box, method = fn(m, 90.0, coverage, np.random.default_rng(1000 * i + s), area=area)
            areas.append(box[2] * box[3] / m.size)
            covs.append(float(box_coverage(hot, np.array(box))) if hot.any() else float("nan"))
            kinds.append(method)
    a, c = np.array(areas), np.array(covs)
    return {"n": len(a), "mean": a.mean(), "q": np.percentile(a, [25, 50, 75]),
            "at_min": float((a < area[0] + 0.05).mean()), "cov": float(np.nanmean(c)),
            "reached": float(np.nanmean(c >= coverage - 1e-9)),
            "motion": float(np.mean([k == "motion" for k in kinds]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="c7978db", help="git revision of the old rule")
    ap.add_argument("--maps", type=int, default=200, help="blob maps per set")
    ap.add_argument("--seeds", type=int, default=5, help="crops per map")
    ap.add_argument("--videos", type=int, default=4, help="synthetic videos (0: skip)")
    args = ap.parse_args()
    from mohico.datasets.load.crops import motion_crop_box

    before = function_at(args.before, "mohico/datasets/load/sampling.py", "motion_crop_box")
    area, coverage = (0.2, 1.0), 0.8
    sets = [("blob 28x28", blob_maps(args.maps, 0, 28, (3, 14), None)),
            ("blob 7x7", blob_maps(args.maps, 1, 7, (1, 4), 0.1))]
    if args.videos:
        with tempfile.TemporaryDirectory() as tmp:
            sets.append(("synthetic clips", synth_clip_maps(args.videos, Path(tmp))))
    print(f"# area ~ U{area}, aspect 3/4-4/3, coverage {coverage} of the cells above the 90th percentile, "
          f"20 sizes x 40 positions; {args.seeds} seeds per map")
    print("| maps | rule | boxes | area mean | area q25 / median / q75 | at min area (< 0.25) "
          "| hot coverage | reached 0.8 | motion crops |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, maps in sets:
        for rule, fn in ((f"before ({args.before}: smallest first)", before),
                         ("after (order drawn, else best)", motion_crop_box)):
            r = measure(fn, maps, args.seeds, area, coverage)
            q = r["q"]
            print(f"| {name} ({len(maps)}) | {rule} | {r['n']} | {r['mean']:.3f} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} "
                  f"| {r['at_min']:.2f} | {r['cov']:.3f} | {r['reached']:.2f} | {r['motion']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
