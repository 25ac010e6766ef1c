"""`mohico eval`: kNN math against a float64 numpy reference, deterministic clips, and end to end
on labelled synthetic shards (the topic labels of the conftest videos)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mohico.config import load_config
from mohico.errors import MohicoError
from mohico.trainer import eval_protocols as P
from mohico.trainer import knn_eval as K

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


def numpy_knn(train, ty, query, num_classes, k, t, exclude=None):
    """float64 reference: a loop over queries."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = np.zeros((len(query), num_classes))
    for i, q in enumerate(query):
        sim = train @ q
        allowed = np.arange(len(train)) if exclude is None else np.flatnonzero(~exclude[i])
        order = allowed[np.argsort(-sim[allowed], kind="stable")][:k]
        for j in order:
            out[i, ty[j]] += np.exp(sim[j] / t)
    return out


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_scores_match_numpy_reference(k):
    g = np.random.default_rng(k)
    train, query = g.normal(size=(60, 16)), g.normal(size=(25, 16))
    ty = g.integers(0, 7, size=60)
    exclude = g.random((25, 60)) < 0.2
    for ex in (None, exclude):
        ref = numpy_knn(train, ty, query, 7, k, 0.1, ex)
        got = K.knn_scores(torch.tensor(train), torch.tensor(ty), torch.tensor(query), 7, k=k, temperature=0.1,
                           exclude=None if ex is None else torch.tensor(ex), chunk=7)
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-4)


def test_topk_accuracy_and_self_exclusion():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    acc = K.topk_accuracy(scores, torch.tensor([1, 2, 0]), (1, 2, 5))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top5": 1.0}
    # a point's own copy would always win; excluded, its true neighbour votes
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    s = K.knn_scores(train, torch.tensor([0, 1, 2]), train[:1], 3, k=1, exclude=torch.tensor([[True, False, False]]))
    assert s.argmax().item() == 1


def test_eval_starts_and_center_box():
    assert K.eval_starts(100, 4, 2, 1) == [46]                   # span 7, centred on frame 50 - 3.5
    starts = K.eval_starts(100, 4, 2, 4)
    assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] <= 100 - 7
    assert K.eval_starts(5, 4, 2, 3) == [0, 0, 0]                # too short: clamped (frames clamp too)
    assert K.center_box(160, 112) == (24, 0, 112, 112)


@pytest.fixture(scope="module")
def labelled_shards(synth_videos, tmp_path_factory) -> Path:
    """The conftest videos (3 topics) as shards with topic labels (the session shards carry none)."""
    from mohico.datasets.write.shards import write_shards

    out = tmp_path_factory.mktemp("labelled")
    write_shards(synth_videos, out, codec="vp9", short_side=64, fps=15, gop=16, max_shard_size=10_000_000,
                 workers=1, flow="dis", labels=synth_videos / "labels.json")
    return out


def test_clips_are_deterministic_and_labelled(labelled_shards, synth_videos):
    cfg = load_config(CONFIG)
    a = list(K.iter_labelled(labelled_shards, cfg.data, clips_per_video=2))
    b = list(K.iter_labelled(labelled_shards, cfg.data, clips_per_video=2))
    labels = json.loads((synth_videos / "labels.json").read_text())
    assert len(a) == len(labels) == 6
    assert sorted(v.label for v in a) == sorted(labels.values())
    for x, y in zip(a, b):
        assert x.clips.shape == (2, 3, cfg.data.clip_len, cfg.data.crop_size, cfg.data.crop_size)
        assert np.array_equal(x.clips, y.clips) and not np.array_equal(x.clips[0], x.clips[1])


def test_unlabelled_shards_are_refused(synth_shards):
    cfg = load_config(CONFIG)
    with pytest.raises(MohicoError, match="--labels"):
        P.knn_eval(K.load_eval_backbone("random", cfg), cfg, synth_shards, synth_shards)


class ColourBackbone(nn.Module):
    """An 'informative' backbone: the mean colour of the clip (the synthetic topics are palettes)."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


def test_informative_embeddings_beat_chance(labelled_shards):
    cfg = load_config(CONFIG)
    res = P.knn_eval(ColourBackbone(), cfg, labelled_shards, labelled_shards, k=1, clips_per_video=2)
    assert res["num_train"] == res["num_val"] == 6 and res["num_classes"] == 3 and res["leave_one_out"] == 6
    assert res["top5"] == 1.0
    assert res["top1"] > res["chance_top1"] + 0.3, res
    noise = nn.Sequential(nn.Flatten(), nn.LazyLinear(1))              # 1-d embedding: cos is +-1, no signal
    assert P.knn_eval(noise, cfg, labelled_shards, labelled_shards, k=1)["num_val"] == 6


def test_cli_end_to_end_and_checkpoint_mismatch(labelled_shards, tmp_path):
    from mohico.models.backbones import build_backbone
    from mohico.models.backbone_file import save_backbone

    ckpt = tmp_path / "b.pt"
    save_backbone(ckpt, "r3d_18", {"width": 8}, build_backbone("r3d_18", width=8))
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "mohico", "eval", str(ckpt), "--config", str(CONFIG), "--train", str(labelled_shards),
           "--val", str(labelled_shards), "--k", "3", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "top-1" in res.stdout
    saved = json.loads(out.read_text())
    assert saved["k"] == 3 and saved["num_val"] == 6 and len(saved["per_video"]) == 6 and 0 <= saved["top1"] <= 1
    # the config asks for another width: a clear error, exit 1
    res = subprocess.run(cmd[:-2] + ["--set", "model.backbone_options={width: 16}"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 1 and "width" in res.stderr and "config" in res.stderr, res.stderr[-2000:]
    # no config and not a run directory: usage error
    res = subprocess.run(cmd[:4] + cmd[6:], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "--config" in res.stderr
