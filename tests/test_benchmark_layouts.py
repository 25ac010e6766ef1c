"""UCF101 / HMDB51 layouts: fabricated trees with the real file names and split files ->
`mohico shards --layout` -> labelled train/test shards per split -> `mohico eval` (incl. a
torchvision state_dict as the backbone)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.config import load_config
from mohico.datasets.write.benchmark_layouts import split_inputs
from mohico.datasets.synthetic.benchmark_synth import synth_benchmark
from mohico.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
SMALL = dict(classes=3, per_class=3, seed=5, fps=15, size=(64, 48), duration=2.4)


def cli(*args):
    """`mohico ARGS` in this process (the CLI's main): exit code, stdout, stderr."""
    from _cli import run_cli_in_process

    return run_cli_in_process([str(a) for a in args], ROOT, {"WANDB_MODE": "offline"})


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ucf")
    synth_benchmark(out, "ucf101", **SMALL)
    return out


@pytest.fixture(scope="module")
def ucf_shards(ucf_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ucf_shards")
    res = cli("shards", ucf_tree / "UCF-101", out, "--layout", "ucf101", "--splits", ucf_tree / "ucfTrainTestlist",
              "--short-side", 48, "--workers", 1, "--quiet", "--flow", "dis-fast")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ucf101 split 1: 6 train, 3 test videos, 3 classes" in res.stdout
    return out / "split1"


def test_ucf101_split_files_are_parsed_like_the_real_ones(ucf_tree):
    splits = ucf_tree / "ucfTrainTestlist"
    assert (splits / "classInd.txt").read_bytes().startswith(b"1 ApplyEyeMakeup\r\n")          # CRLF like the real files
    assert "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 1" in (splits / "trainlist01.txt").read_text()
    sp = split_inputs("ucf101", ucf_tree / "UCF-101", splits, 1)
    assert sp.classes == ["ApplyEyeMakeup", "Archery", "BabyCrawling"] and not sp.missing
    assert [s for _, s in sp.test] == [f"{c}/v_{c}_g01_c01.avi" for c in sp.classes]           # group 1 tests
    assert sorted(s for _, s in sp.train) == sorted(f"{c}/v_{c}_g0{g}_c01.avi" for c in sp.classes for g in (2, 3))
    assert sp.labels["Archery/v_Archery_g02_c01.avi"] == "Archery"
    assert all(Path(p).is_file() for p, _ in sp.train + sp.test)
    # a listed video that is not there is reported, the others kept; a bad class is an error naming the line
    (ucf_tree / "UCF-101" / "Archery" / "v_Archery_g02_c01.avi").rename(ucf_tree / "moved.avi")
    try:
        sp = split_inputs("ucf101", ucf_tree / "UCF-101", splits, 1)
        assert sp.missing == ["Archery/v_Archery_g02_c01.avi"] and len(sp.train) == 5
    finally:
        (ucf_tree / "moved.avi").rename(ucf_tree / "UCF-101" / "Archery" / "v_Archery_g02_c01.avi")
    bad = ucf_tree / "bad"
    bad.mkdir()
    (bad / "classInd.txt").write_text("1 Archery\n")
    (bad / "trainlist01.txt").write_text("Bowling/v_Bowling_g01_c01.avi 2\n")
    (bad / "testlist01.txt").write_text("")
    with pytest.raises(UsageError, match="trainlist01.txt line 1.*Bowling"):
        split_inputs("ucf101", ucf_tree / "UCF-101", bad, 1)
    with pytest.raises(UsageError, match="classInd.txt"):
        split_inputs("ucf101", ucf_tree / "UCF-101", ucf_tree, 1)


def test_hmdb51_split_markers(tmp_path):
    synth_benchmark(tmp_path, "hmdb51", classes=2, per_class=4, seed=1, size=(64, 48), duration=1.2)
    splits = tmp_path / "testTrainMulti_7030_splits"
    lines = (splits / "brush_hair_test_split2.txt").read_text().splitlines()
    assert lines[0] == "Subject0_brush_hair_u_cm_np1_fr_med_0.avi 1 "           # the real files' trailing space
    assert [ln.split()[1] for ln in lines] == ["1", "2", "1", "0"]
    sp = split_inputs("hmdb51", tmp_path / "hmdb51", splits, 2)
    assert sp.classes == ["brush_hair", "cartwheel"] and len(sp.train) == 4 and len(sp.test) == 2
    assert {sp.labels[s] for _, s in sp.test} == {"brush_hair", "cartwheel"}
    with pytest.raises(UsageError, match="test_split"):
        split_inputs("hmdb51", tmp_path / "hmdb51", tmp_path, 1)


@pytest.mark.slow
def test_layout_shards_carry_class_labels_and_eval_reads_a_torchvision_state_dict(ucf_shards, tmp_path):
    from mohico.datasets.shard_list import expand_shards
    from mohico.datasets.load.pipeline_stream import iter_shard
    from mohico.models.backbones import build_backbone
    from mohico.models.backbone_file import save_backbone
    from mohico.models.export import to_torchvision
    from mohico.eval.knn import load_eval_backbone

    labels = json.loads((ucf_shards / "labels.json").read_text())
    metas = [json.loads(s["json"]) for u in expand_shards(ucf_shards / "test") for s in iter_shard(u, [])]
    assert len(metas) == 3 and all(m["label"] == labels[m["source"]] == m["source"].split("/")[0] for m in metas)
    assert (ucf_shards / "classes.txt").read_text().split() == ["ApplyEyeMakeup", "Archery", "BabyCrawling"]
    # a torchvision state_dict (what `mohico export --format torchvision` writes) loads to the same weights
    torch.manual_seed(0)
    net = build_backbone("r3d_18", width=64)
    tv = tmp_path / "r3d_tv.pt"
    torch.save(to_torchvision(net), tv)
    cfg = load_config(CONFIG, ["model.backbone_options={width: 64}"])
    got = load_eval_backbone(tv, cfg)
    for k, v in net.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    mohico_file = tmp_path / "r3d.pt"
    save_backbone(mohico_file, "r3d_18", {"width": 64}, net)
    outs = {}
    for name, ckpt in (("tv", tv), ("mohico", mohico_file)):
        outs[name] = tmp_path / f"{name}.json"
        res = cli("eval", "retrieval", ckpt, "--config", CONFIG, "--set", "model.backbone_options={width: 64}",
                  "--train", ucf_shards / "train", "--val", ucf_shards / "test", "--recall-at", "1,5",
                  "--out", outs[name], "--no-wandb")
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (json.loads(outs[n].read_text()) for n in ("tv", "mohico"))
    assert a["num_train"] == 6 and a["num_test"] == 3 and a["num_classes"] == 3
    assert a["per_video"] == b["per_video"] and a["recall@1"] == b["recall@1"]
    # a state_dict of another model is not mistaken for one: the generic loader's clear error
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    res = cli("eval", "retrieval", tmp_path / "other.pt", "--config", CONFIG, "--train", ucf_shards / "train",
              "--val", ucf_shards / "test", "--no-wandb")
    assert res.returncode == 1 and "not a mohico checkpoint" in res.stderr, res.stderr[-2000:]


def test_linear_on_layout_shards_with_eval_time_labels(ucf_shards, tmp_path):
    """Eval-time labels replace the shards' (here: a coarser 2-class grouping) without re-encoding."""
    from mohico.eval import protocols as P
    from mohico.eval.knn import load_eval_backbone

    cfg = load_config(CONFIG)
    net = load_eval_backbone("random", cfg)
    labels = json.loads((ucf_shards / "labels.json").read_text())
    coarse = {src: ("A" if cls.startswith("A") else "B") for src, cls in labels.items()}
    train = P.features(net, cfg, ucf_shards / "train", labels=coarse, clips_per_video=2, spatial_crops=3,
                       cache_dir=tmp_path)
    test = P.features(net, cfg, ucf_shards / "test", labels=coarse, clips_per_video=2, spatial_crops=3,
                      cache_dir=tmp_path)
    assert sorted(set(train.labels)) == ["A", "B"] and train.feats.shape[:2] == (6, 6)
    res = P.linear(train, test, lrs=(0.1,), weight_decays=(0.0,), epochs=5)
    assert res["num_classes"] == 2 and res["train_views"] == 36
    # the reference: top-1 from the same probe recomputed in numpy
    from mohico.eval.linear_probe import fit_linear
    classes = ["A", "B"]
    ty = np.repeat([classes.index(c) for c in train.labels], 6)
    probe = fit_linear(train.feats.reshape(-1, train.feats.shape[2]), ty, 2, 0.1, 0.0, 5, 256)
    z = (test.feats.astype(np.float64) - probe.mean.numpy()) / probe.std.numpy()
    logits = z @ probe.weight.numpy().astype(np.float64).T + probe.bias.numpy()
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(1)
    qy = np.array([classes.index(c) for c in test.labels])
    assert res["top1"] == pytest.approx(float(np.mean(p.argmax(1) == qy)))
