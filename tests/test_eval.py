"""`mohico eval`: kNN math against a float64 numpy reference, deterministic clips, and end to end
on labelled synthetic shards (the topic labels of the conftest videos)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mohico.config import load_config
from mohico.errors import MohicoError
from mohico.eval import protocols as P
from mohico.datasets.load import eval_clips as C
from mohico.eval import knn as K

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


def numpy_knn_votes(train, ty, query, num_classes, k, t, exclude=None):
    """float64 reference: a loop over queries; ``(scores, votes)`` per query and class: the sum of
    exp(cos / t) over the k nearest allowed train rows of the class, and how many of them there are."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = np.zeros((len(query), num_classes))
    votes = np.zeros((len(query), num_classes), dtype=np.int64)
    for i, q in enumerate(query):
        sim = train @ q
        allowed = np.arange(len(train)) if exclude is None else np.flatnonzero(~exclude[i])
        order = allowed[np.argsort(-sim[allowed], kind="stable")][:k]
        for j in order:
            out[i, ty[j]] += np.exp(sim[j] / t)
            votes[i, ty[j]] += 1
    return out, votes


def numpy_knn(train, ty, query, num_classes, k, t, exclude=None):
    return numpy_knn_votes(train, ty, query, num_classes, k, t, exclude)[0]


def reference_ranking(scores, votes):
    """Per query the classes that got a vote, by descending score, ties to the lower class index
    (Python's sort on the key (-score, class)); classes without a vote are not ranked at all."""
    return [sorted((c for c in range(len(s)) if v[c] > 0), key=lambda c: (-s[c], c)) for s, v in zip(scores, votes)]


def reference_topn(scores, votes, labels, ns=(1, 5)):
    """Weighted-kNN top-n from the definition: a hit when the label is among the first n ranked classes."""
    ranked = reference_ranking(scores, votes)
    return {f"top{n}": float(np.mean([y in r[:n] for y, r in zip(labels, ranked)])) for n in ns}


def solo_learn_topn(scores, labels, k):
    """solo-learn's WeightedKNNClassifier.compute rule, literally: every class sorted by score
    (descending; here stable), top-1 = the first, top-5 = the first min(5, k)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return {"top1": float(np.mean(order[:, 0] == labels)),
            "top5": float(np.mean((order[:, :min(5, k)] == labels[:, None]).any(axis=1)))}


def min_score_gap(scores, votes):
    """The smallest relative gap between two voted classes' reference scores of one query: the
    float32 vote ranks them as float64 does when this is far above float32's 6e-8."""
    gaps = [1.0]
    for s, v in zip(scores, votes):
        x = np.sort(s[v > 0])
        if len(x) > 1:
            gaps.append(float(np.min(np.diff(x) / x[1:])))
    return min(gaps)


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


@pytest.mark.parametrize("k", [1, 3, 20])
def test_knn_top1_top5_match_the_weighted_knn_definition(k):
    """knn() on FeatureSets against the float64 definition: ranked voted classes, ties to the lower index.
    With exclusion (the same set as both: leave-one-out) and without."""
    from mohico.eval.features import FeatureSet

    g = np.random.default_rng(10 + k)
    classes = 7
    tr_y, te_y = g.integers(0, classes, 80), g.integers(0, classes, 40)
    centres = g.normal(size=(classes, 12))
    tr = (0.7 * centres[tr_y] + g.normal(size=(80, 12))).astype(np.float32)[:, None, :]
    te = (0.7 * centres[te_y] + g.normal(size=(40, 12))).astype(np.float32)[:, None, :]
    names = [f"c{c}" for c in range(classes)]                 # sorted names = class indices
    train = FeatureSet([f"t{i}" for i in range(80)], [""] * 80, [names[c] for c in tr_y], tr)
    test = FeatureSet([f"q{i}" for i in range(40)], [""] * 40, [names[c] for c in te_y], te)
    assert set(tr_y) == set(range(classes))
    for query, qy, ex in ((test, te_y, None), (train, tr_y, np.eye(80, dtype=bool))):   # the same set: no self-vote
        scores, votes = numpy_knn_votes(tr[:, 0].astype(np.float64), tr_y, query.video_features().astype(np.float64),
                                        classes, k, 0.07, ex)
        assert min_score_gap(scores, votes) > 1e-4                 # no near-tie that float32 could reorder
        ref = reference_topn(scores, votes, qy)
        got = P.knn(train, query, k=k, temperature=0.07)
        assert got["leave_one_out"] == (0 if ex is None else 80)
        assert (got["top1"], got["top5"]) == (ref["top1"], ref["top5"]), (k, got["top5"], ref)
        assert [names.index(r["pred"]) for r in got["per_video"]] == [r[0] for r in reference_ranking(scores, votes)]
        # solo-learn's literal rule agrees where it only reaches voted classes: k = 1, or >= 5 classes voted
        if k == 1 or (votes > 0).sum(axis=1).min() >= 5:
            assert solo_learn_topn(scores, qy, k) == ref
        if k == 1:
            assert got["top5"] == got["top1"] < 1.0


def test_knn_top5_with_one_neighbour_and_five_classes_is_not_full_by_construction():
    """k = 1, 5 classes, features without class signal: one class gets a vote, so top-5 = top-1
    (about 1/5 here); counting the 4 classes nobody voted for made top-5 100% whatever the features."""
    from mohico.eval.features import FeatureSet

    g = np.random.default_rng(4)
    tr_y, te_y = np.arange(100) % 5, np.arange(50) % 5
    tr, te = g.normal(size=(100, 1, 16)).astype(np.float32), g.normal(size=(50, 1, 16)).astype(np.float32)
    train = FeatureSet([f"t{i}" for i in range(100)], [""] * 100, [f"c{c}" for c in tr_y], tr)
    test = FeatureSet([f"q{i}" for i in range(50)], [""] * 50, [f"c{c}" for c in te_y], te)
    scores, votes = numpy_knn_votes(tr[:, 0].astype(np.float64), tr_y, te[:, 0].astype(np.float64), 5, 1, 0.07)
    ref = reference_topn(scores, votes, te_y)
    got = P.knn(train, test, k=1)
    assert got["top5"] == ref["top5"] == ref["top1"] == got["top1"] == solo_learn_topn(scores, te_y, 1)["top5"]
    assert got["top5"] < 0.5, got["top5"]


def test_knn_ties_go_to_the_lower_class_index():
    """Exact ties (identical unit train rows, cos exactly 1): the lower class index ranks first,
    whatever the train order; a class with no vote ranks after every voted class and never hits."""
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    for order in ([4, 2, 3, 1], [1, 3, 2, 4]):                      # four tied voters of classes 1-4 ...
        train = torch.tensor([e0] * 4 + [e1])
        ty = torch.tensor(order + [0])                              # ... and class 0 far away
        scores, votes = K.knn_vote(train, ty, torch.tensor([e0]), 6, k=4)
        assert torch.equal(votes, torch.tensor([[0, 1, 1, 1, 1, 0]]))
        assert K.ranked_classes(scores, votes > 0).tolist() == [[1, 2, 3, 4, 0, 5]]
        for label, top1, top3 in ((1, 1.0, 1.0), (3, 0.0, 1.0), (4, 0.0, 0.0), (0, 0.0, 0.0), (5, 0.0, 0.0)):
            acc = K.topk_accuracy(scores, torch.tensor([label]), (1, 3, 6), votes > 0)
            assert acc == {"top1": top1, "top3": top3, "top6": 1.0 if label in (1, 2, 3, 4) else 0.0}, (label, acc)
    # without a candidate mask every class is ranked, ties in class order (the linear probe's scores)
    s = torch.tensor([[0.2, 0.5, 0.2, 0.5, 0.1]])
    assert K.ranked_classes(s).tolist() == [[1, 3, 0, 2, 4]]
    assert K.topk_accuracy(s, torch.tensor([2]), (3, 4)) == {"top3": 0.0, "top4": 1.0}


def test_topk_accuracy_and_self_exclusion():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    acc = K.topk_accuracy(scores, torch.tensor([1, 2, 0]), (1, 2, 5))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top5": 1.0}
    # a point's own copy would always win; excluded, its true neighbour votes
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    s = K.knn_scores(train, torch.tensor([0, 1, 2]), train[:1], 3, k=1, exclude=torch.tensor([[True, False, False]]))
    assert s.argmax().item() == 1


def test_eval_starts_and_center_box():
    assert C.eval_starts(100, 4, 2, 1) == [46]                   # span 7, centred on frame 50 - 3.5
    starts = C.eval_starts(100, 4, 2, 4)
    assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] <= 100 - 7
    assert C.eval_starts(5, 4, 2, 3) == [0, 0, 0]                # too short: clamped (frames clamp too)
    assert C.center_box(160, 112) == (24, 0, 112, 112)


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
    a = list(C.iter_labelled(labelled_shards, cfg.data, clips_per_video=2))
    b = list(C.iter_labelled(labelled_shards, cfg.data, clips_per_video=2))
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
    assert res["top5"] == res["top1"]                                 # k = 1: one class votes
    assert res["top1"] > res["chance_top1"] + 0.3, res
    noise = nn.Sequential(nn.Flatten(), nn.LazyLinear(1))              # 1-d embedding: cos is +-1, no signal
    assert P.knn_eval(noise, cfg, labelled_shards, labelled_shards, k=1)["num_val"] == 6


def test_precise_bn_protocol_normalises_with_the_train_views_statistics(labelled_shards):
    """run_protocol(precise_bn_batches=N) scores the backbone after precise_bn on N batches of the
    train shards' views: the same BN buffers and kNN as doing it by hand, other features than the
    running statistics give."""
    from mohico.eval.features import embed_views, precise_bn

    cfg = load_config(CONFIG)
    cpu = torch.device("cpu")
    views = lambda: list(C.iter_labelled(labelled_shards, cfg.data, 2))         # 6 videos x 2 clips
    manual = K.load_eval_backbone("random", cfg)
    assert precise_bn(manual, (c for v in views() for c in v.clips), cpu, 4, 2) == 8
    feats = embed_views(manual, views(), cpu).labelled()
    want = P.knn(feats, feats, k=3)
    backbone = K.load_eval_backbone("random", cfg)
    res = P.run_protocol("knn", backbone, cfg, labelled_shards, labelled_shards, {"k": 3}, clips_per_video=2,
                         batch_size=4, precise_bn_batches=2)
    assert res["bn_statistics"] == "precise: 8 train clips" and res["bn_precise_clips"] == 8
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), manual.state_dict().values()))
    assert (res["top1"], res["per_video"]) == (want["top1"], want["per_video"])
    running = K.load_eval_backbone("random", cfg)
    assert P.run_protocol("knn", running, cfg, labelled_shards, labelled_shards, {"k": 3}, clips_per_video=2,
                          batch_size=4)["bn_statistics"] == "running"
    assert not np.allclose(embed_views(running, views(), cpu).feats, feats.feats, atol=1e-3)


@pytest.mark.slow
def test_cli_end_to_end_and_checkpoint_mismatch(labelled_shards, tmp_path):
    from mohico.models.backbones import build_backbone
    from mohico.models.backbone_file import save_backbone

    ckpt = tmp_path / "b.pt"
    save_backbone(ckpt, "r3d_18", {"width": 8}, build_backbone("r3d_18", width=8))
    out = tmp_path / "res.json"
    from _cli import run_cli_in_process

    def cli(args):   # `mohico ARGS` in this process (the CLI's main): exit code, stdout, stderr
        return run_cli_in_process(args, ROOT, {"WANDB_MODE": "offline"})

    cmd = ["eval", str(ckpt), "--config", str(CONFIG), "--train", str(labelled_shards),
           "--val", str(labelled_shards), "--k", "3", "--out", str(out)]
    res = cli(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "top-1" in res.stdout
    saved = json.loads(out.read_text())
    assert saved["k"] == 3 and saved["num_val"] == 6 and len(saved["per_video"]) == 6 and 0 <= saved["top1"] <= 1
    assert saved["bn_statistics"] == "running"
    # --precise-bn: the statistics of the 6 train views (a batch of 4, then the other 2), in the table and the JSON
    res = cli(cmd + ["--precise-bn", "2", "--batch-size", "4"])
    assert res.returncode == 0 and "precise: 6 train clips" in res.stdout, res.stderr[-3000:]
    assert json.loads(out.read_text())["bn_precise_clips"] == 6
    res = cli(cmd + ["--precise-bn", "2", "--batch-size", "1"])
    assert res.returncode == 2 and "--precise-bn" in res.stderr
    # the config asks for another width: a clear error, exit 1
    res = cli(cmd[:-2] + ["--set", "model.backbone_options={width: 16}"])
    assert res.returncode == 1 and "width" in res.stderr and "config" in res.stderr, res.stderr[-2000:]
    # no config and not a run directory: usage error
    res = cli(cmd[:1] + cmd[3:])
    assert res.returncode == 2 and "--config" in res.stderr
