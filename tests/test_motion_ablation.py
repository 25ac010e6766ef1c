"""benchmarks/motion_ablation.py reuses finished runs: only runs of the same recipe."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest


def _finished(run: Path, knn: float, scores: str = "eval-test100.json", version: int | None = None) -> None:
    """A run dir as the driver leaves it: trained and evaluated (on 100 test videos; ``eval.json``:
    as an older driver left it)."""
    run.mkdir(parents=True)
    (run / "train_done.json").write_text(json.dumps({"seconds": 12.0, "cmd": []}))
    metrics = {"knn": {"top1": knn}, "retrieval": {"recall@1": 0.1, "recall@5": 0.5}, "linear": {"top1": 0.2}}
    if version is not None:
        metrics["eval_version"] = version
    (run / scores).write_text(json.dumps(metrics))


def test_a_run_of_another_recipe_is_refused_not_reused(tmp_path, benchmark_script):
    """The fault: after a config change (here the backbone input) the driver skipped every finished
    run by its eval.json and mixed the old config's numbers into the new table."""
    m = benchmark_script("motion_ablation")
    args = argparse.Namespace(work=str(tmp_path), set=[], steps=300, clips=4, train_videos=200, test_videos=100)
    old = argparse.Namespace(**{**vars(args), "set": ["model.backbone_options={width: 8, input: rgb}"]})
    run = tmp_path / "runs" / "nce-s0"
    _finished(run, 0.33, version=m.EVAL_VERSION)
    (run / "recipe.json").write_text(json.dumps(m.run_recipe("nce", 0, old)))
    with pytest.raises(SystemExit, match=r"nce-s0: made by another recipe \(config.model.backbone_options.input: "
                                         r"'rgb' -> 'residual'\).*another --work"):
        m.job("nce", 0, args, tmp_path / "train", tmp_path / "test")

    # the same recipe: the finished run is reused as it is
    row = m.job("nce", 0, old, tmp_path / "train", tmp_path / "test")
    assert row["knn/top1"] == 0.33 and row["train_seconds"] == 12.0
    # so is another seed, steps or arm a different recipe
    for arm, seed, steps in (("nce", 1, 300), ("nce", 0, 600), ("mcl", 0, 300)):
        other = m.run_recipe(arm, seed, argparse.Namespace(**{**vars(old), "steps": steps}))
        assert other != m.run_recipe("nce", 0, old)
    # the random arm's recipe does not depend on --steps (it is not trained)
    assert m.run_recipe("random", 0, args) == m.run_recipe("random", 0, argparse.Namespace(**{**vars(args), "steps": 9}))


def test_a_finished_run_without_a_recipe_is_refused(tmp_path, benchmark_script):
    m = benchmark_script("motion_ablation")
    args = argparse.Namespace(work=str(tmp_path), set=[], steps=300, clips=4, train_videos=200, test_videos=100)
    for name, scores in (("mcl-s2", "eval.json"), ("nce-s2", "eval-test500.json")):
        _finished(tmp_path / "runs" / name, 0.4, scores)
    with pytest.raises(SystemExit, match="nce-s2: a run without recipe.json.*delete that run dir"):
        m.job("nce", 2, args, tmp_path / "train", tmp_path / "test")
    with pytest.raises(SystemExit, match="mcl-s2: a run without recipe.json.*delete that run dir"):
        m.job("mcl", 2, args, tmp_path / "train", tmp_path / "test")
    # a new run dir gets its recipe written before anything runs
    fresh = tmp_path / "runs" / "nce-s1"
    m.check_run(fresh, m.run_recipe("nce", 1, args))
    assert json.loads((fresh / "recipe.json").read_text()) == m.run_recipe("nce", 1, args)


def test_an_evaluation_on_another_test_set_is_not_reused(tmp_path, monkeypatch, benchmark_script):
    """The fault: eval.json did not record which test videos it scored, so re-running a work dir with
    --test-videos 500 silently reused the scores on 100 test videos. A run's evaluation is now kept
    per test set (the run itself, trained on the train videos only, is reused)."""
    m = benchmark_script("motion_ablation")
    args = argparse.Namespace(work=str(tmp_path), set=[], steps=300, clips=4, train_videos=200, test_videos=100)
    run = tmp_path / "runs" / "nce-s0"
    m.check_run(run, m.run_recipe("nce", 0, args))
    (run / "train_done.json").write_text(json.dumps({"seconds": 12.0, "cmd": []}))
    evaluated = []

    def fake_eval(cmd, **kw):          # stands in for the child process of evaluate()
        test_shards = Path(cmd[cmd.index("--_eval") + 5])
        n = int(test_shards.name.rsplit("-", 1)[1])
        evaluated.append(n)
        metrics = {"knn": {"top1": n / 1000}, "retrieval": {"recall@1": 0.1, "recall@5": 0.5}, "linear": {"top1": 0.2},
                   "eval_version": m.EVAL_VERSION}
        (run / m.eval_name(n)).write_text(json.dumps(metrics))

    monkeypatch.setattr(m.subprocess, "run", fake_eval)
    assert m.job("nce", 0, args, tmp_path / "shards-train-200", tmp_path / "shards-test-100")["knn/top1"] == 0.1
    big = argparse.Namespace(**{**vars(args), "test_videos": 500})
    assert m.job("nce", 0, big, tmp_path / "shards-train-200", tmp_path / "shards-test-500")["knn/top1"] == 0.5
    assert evaluated == [100, 500]
    # both evaluations stay; a third call reuses the first
    assert m.job("nce", 0, args, tmp_path / "shards-train-200", tmp_path / "shards-test-100")["knn/top1"] == 0.1
    assert evaluated == [100, 500]
    # scores of an older evaluation protocol are redone, not reused
    (run / m.eval_name(100)).write_text(json.dumps({"knn": {"top1": 0.9}, "eval_version": m.EVAL_VERSION - 1}))
    assert m.job("nce", 0, args, tmp_path / "shards-train-200", tmp_path / "shards-test-100")["knn/top1"] == 0.1
    assert evaluated == [100, 500, 100]


def test_a_run_pretrained_on_other_train_videos_is_refused(tmp_path, benchmark_script):
    """The pretraining data is part of a run's recipe: a run trained on 200 videos does not stand in
    for one on 400."""
    m = benchmark_script("motion_ablation")
    args = argparse.Namespace(work=str(tmp_path), set=[], steps=300, clips=4, train_videos=200, test_videos=500)
    m.check_run(tmp_path / "runs" / "mcl-s0", m.run_recipe("mcl", 0, args))
    more = argparse.Namespace(**{**vars(args), "train_videos": 400})
    with pytest.raises(SystemExit, match=r"mcl-s0: made by another recipe \(train_videos: 200 -> 400\)"):
        m.check_run(tmp_path / "runs" / "mcl-s0", m.run_recipe("mcl", 0, more))
    # the test set is not: it only decides which evaluation file is read
    other_test = argparse.Namespace(**{**vars(args), "test_videos": 100})
    assert m.run_recipe("mcl", 0, other_test) == m.run_recipe("mcl", 0, args)


def test_videos_of_another_motion_style_are_refused(tmp_path, benchmark_script):
    """A work dir made with one motion style per video is not reused for ``--motion-style shot``
    (the table would silently score the other benchmark); videos written before the option count
    as per video."""
    m = benchmark_script("motion_ablation")
    from mohico.datasets.synthetic.synth_motion import VERSION

    videos = tmp_path / "videos-train-200"
    videos.mkdir()
    gt = {"generator": {"name": "mohico-synth-motion", "version": VERSION}, "width": 128, "height": 128}
    (videos / "video_00000.json").write_text(json.dumps(gt))
    m.check_videos(videos, 128, "video")
    with pytest.raises(SystemExit, match="per video.*per shot"):
        m.check_videos(videos, 128, "shot")
    (videos / "video_00000.json").write_text(json.dumps({**gt, "style_per": "shot"}))
    m.check_videos(videos, 128, "shot")
    with pytest.raises(SystemExit, match="--work"):
        m.check_videos(videos, 128, "video")
    with pytest.raises(SystemExit, match="at 128 px"):
        m.check_videos(videos, 64, "shot")


def test_paired_table_subtracts_the_same_seeds_random_init(benchmark_script):
    m = benchmark_script("motion_ablation")
    keys = [f"{p}/{q}" for p, q in m.METRICS]
    rows = [{"arm": "random", "seed": s, **{k: v for k in keys}} for s, v in ((0, 0.40), (1, 0.50))]
    rows += [{"arm": "mcl", "seed": s, **{k: v for k in keys}} for s, v in ((0, 0.43), (1, 0.52), (2, 0.90))]
    text = m.paired_table(rows)
    line = next(row for row in text.splitlines() if row.startswith("| mcl |"))
    assert line.startswith("| mcl | 2 | +2.5 ± 0.7 (+3.0, +2.0) |")     # seed 2 has no random init: left out
    assert "| random |" not in text


def test_eval_clips_cache_round_trips_without_pickle(tmp_path, monkeypatch, benchmark_script):
    """The ablation's eval-clip cache holds arrays and strings, not pickled classes: it is read back
    with pickles refused and gives the decoded clips bit for bit (a pickle of the class broke every
    cached work dir when the class moved from mohico.trainer.knn_eval to mohico.datasets)."""
    import numpy as np

    import mohico.datasets.load.eval_clips as ec
    from mohico.config import load_config

    m = benchmark_script("motion_ablation")
    rng = np.random.default_rng(0)
    made = [ec.LabelledVideo(f"v{i}", lab, rng.standard_normal((4, 3, 8, 64, 64)).astype(np.float32), f"s{i}.avi")
            for i, lab in enumerate(["horizontal", "circle", "horizontal"])]
    calls = []
    monkeypatch.setattr(ec, "iter_labelled", lambda *a, **k: calls.append(a) or iter(made))
    cfg = load_config(m.CONFIG)
    shards = tmp_path / "shards-train-3"
    first = m.eval_clips(shards, cfg, 4)
    again = m.eval_clips(shards, cfg, 4)
    assert len(calls) == 1                                   # decoded once, then read from the cache
    (cache,) = tmp_path.glob("shards-train-3.evalclips-*")
    with np.load(cache, allow_pickle=False) as z:            # no pickled object inside
        assert sorted(z.files) == ["clips", "keys", "labels", "sources"]
    for got in (first, again):
        assert [(v.key, v.label, v.source) for v in got] == [(v.key, v.label, v.source) for v in made]
        assert all(np.array_equal(g.clips, v.clips) for g, v in zip(got, made))
