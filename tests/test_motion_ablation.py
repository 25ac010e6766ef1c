"""benchmarks/motion_ablation.py reuses finished runs: only runs of the same recipe."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("motion_ablation", ROOT / "benchmarks" / "motion_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finished(run: Path, knn: float) -> None:
    """A run dir as the driver leaves it: trained and evaluated."""
    run.mkdir(parents=True)
    (run / "train_done.json").write_text(json.dumps({"seconds": 12.0, "cmd": []}))
    metrics = {"knn": {"top1": knn}, "retrieval": {"recall@1": 0.1, "recall@5": 0.5}, "linear": {"top1": 0.2}}
    (run / "eval.json").write_text(json.dumps(metrics))


def test_a_run_of_another_recipe_is_refused_not_reused(tmp_path):
    """The fault: after a config change (here the backbone input) the driver skipped every finished
    run by its eval.json and mixed the old config's numbers into the new table."""
    m = _driver()
    args = argparse.Namespace(work=str(tmp_path), set=[], steps=300, clips=4)
    old = argparse.Namespace(**{**vars(args), "set": ["model.backbone_options={width: 8, input: rgb}"]})
    run = tmp_path / "runs" / "nce-s0"
    _finished(run, 0.33)
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


def test_a_finished_run_without_a_recipe_is_refused(tmp_path):
    m = _driver()
    args = argparse.Namespace(work=str(tmp_path), set=[], steps=300, clips=4)
    _finished(tmp_path / "runs" / "mcl-s2", 0.4)
    with pytest.raises(SystemExit, match="mcl-s2: a run without recipe.json.*delete that run dir"):
        m.job("mcl", 2, args, tmp_path / "train", tmp_path / "test")
    # a new run dir gets its recipe written before anything runs
    fresh = tmp_path / "runs" / "nce-s1"
    m.check_run(fresh, m.run_recipe("nce", 1, args))
    assert json.loads((fresh / "recipe.json").read_text()) == m.run_recipe("nce", 1, args)
