"""Evaluation protocols on fixed features against float64 numpy references (retrieval recall,
linear-probe SGD, multi-view averaging), then features from shards (cache, eval-time labels)
and `mohico eval retrieval|linear` end to end."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mohico.config import load_config
from mohico.errors import MohicoError
from mohico.eval import protocols as P
from mohico.eval.features import FeatureSet, extract_features
from mohico.eval.linear_probe import fit_linear, stratified_folds, stratified_holdout, video_probabilities

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


# --------------------------------------------------------------------------- references
def numpy_recall(gallery, gl, query, ql, ks, exclude=None, center=True):
    """float64 reference: CoCLR's test_retrieval (``center``: each set minus its own mean, then
    L2-normalise; else plain cosine); per query sort the allowed gallery by cosine, look for the label."""
    g, q = np.asarray(gallery, dtype=np.float64), np.asarray(query, dtype=np.float64)
    if center:
        g, q = g - g.mean(axis=0), q - q.mean(axis=0)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(q)):
            allowed = np.arange(len(g)) if exclude is None else np.flatnonzero(~exclude[i])
            order = allowed[np.argsort(-(g[allowed] @ q[i]), kind="stable")][:k]
            hits += bool(np.any(gl[order] == ql[i]))
        out[f"recall@{k}"] = hits / len(q)
    return out


def numpy_linear(x, y, k, lr, wd, epochs, batch_size, momentum, perms):
    """float64 reference of the probe: standardise, SGD with momentum + cosine lr on softmax CE."""
    x = x.astype(np.float64)
    mean, std = x.mean(0), np.sqrt(x.var(0) + 1e-6)
    z = (x - mean) / std
    n, d = z.shape
    w, b = np.zeros((k, d)), np.zeros(k)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    steps = math.ceil(n / batch_size)
    total, t = epochs * steps, 0
    for e in range(epochs):
        for s in range(steps):
            idx = perms[e][s * batch_size:(s + 1) * batch_size]
            logits = z[idx] @ w.T + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1
            g = p / len(idx)
            lr_t = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            vw = momentum * vw + g.T @ z[idx] + wd * w
            vb = momentum * vb + g.sum(0)
            w, b, t = w - lr_t * vw, b - lr_t * vb, t + 1
    return mean, std, w, b


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("center", [True, False])
def test_retrieval_recall_matches_numpy_reference(seed, center):
    g = np.random.default_rng(seed)
    gallery, query = g.normal(size=(40, 8)) + 0.5, g.normal(size=(15, 8)) - 0.3
    gl, ql = g.integers(0, 5, 40), g.integers(0, 5, 15)
    exclude = g.random((15, 40)) < 0.3
    ks = (1, 5, 10, 20, 50)
    for ex in (None, exclude):
        got = P.retrieval_recall(gallery, gl, query, ql, ks, ex, center=center)
        ref = numpy_recall(gallery, gl, query, ql, ks, ex, center=center)
        assert got == pytest.approx(ref, abs=1e-12)
    # k beyond the gallery: every query whose class is anywhere in the gallery hits
    got = P.retrieval_recall(gallery[:3], [0, 1, 2], query[:4], [0, 1, 3, 2], (50,), center=center)
    assert got["recall@50"] == 0.75


def relu_sets(seed=3, classes=5, dim=16):
    """Post-ReLU-like video features (a positive common part, per-video scale, little class signal)
    where centring each set by its own mean changes recall@1 by more than 0.1: train 60, test 40."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim))

    def make(n, prefix):
        y = g.integers(0, classes, n)
        scale = np.exp(g.uniform(np.log(0.1), np.log(10), (n, 1)))
        x = np.maximum(1.0 + scale * (centres[y] + 1.5 * g.normal(size=(n, dim))), 0) + 1e-3
        keys = [f"{prefix}{i}" for i in range(n)]
        return FeatureSet(keys, keys, [f"class{c}" for c in y], x[:, None, :].astype(np.float32)), y

    return make(60, "tr"), make(40, "te")


def test_retrieval_defaults_to_coclr_centring_and_no_center_turns_it_off():
    (train, ty), (test, qy) = relu_sets()
    gf, qf = train.video_features().astype(np.float64), test.video_features().astype(np.float64)
    ks = (1, 5, 10)
    centred, plain = (numpy_recall(gf, ty, qf, qy, ks, center=c) for c in (True, False))
    assert abs(centred["recall@1"] - plain["recall@1"]) > 0.1, (centred, plain)   # the two protocols differ here
    def recalls(res):
        return {f"recall@{k}": res[f"recall@{k}"] for k in ks}

    default = P.retrieval(train, test, ks=ks)
    assert default["retrieval_protocol"] == "coclr-centred" and recalls(default) == pytest.approx(centred, abs=1e-12)
    off = P.retrieval(train, test, ks=ks, center=False)
    assert off["retrieval_protocol"] == "uncentred" and recalls(off) == pytest.approx(plain, abs=1e-12)
    from mohico.eval.report import results_table
    for res in (default, off):                                    # the printed table names the protocol too
        assert re.search(rf"^retrieval_protocol +\| +{res['retrieval_protocol']}$",
                         results_table({"protocol": "retrieval", **res}), flags=re.M)
    # each query's nearest train video is the reference's under either protocol
    for res, center in ((default, True), (off, False)):
        g, q = (gf - gf.mean(0), qf - qf.mean(0)) if center else (gf, qf)
        sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
        assert [r["nearest"] for r in res["per_video"]] == [train.keys[j] for j in sim.argmax(axis=1)]
    assert P.retrieval_recall(gf, ty, qf, qy, ks) == recalls(default)             # the array API's default too
    # centring a set of one video leaves it no direction: refused, with the way out
    one = FeatureSet(test.keys[:1], test.sources[:1], test.labels[:1], test.feats[:1])
    with pytest.raises(MohicoError, match="--no-center"):
        P.retrieval(train, one)
    assert P.retrieval(train, one, center=False)["num_test"] == 1


@pytest.mark.parametrize("batch_size", [64, 10])
def test_fit_linear_matches_numpy_sgd(batch_size):
    g = np.random.default_rng(3)
    x = g.normal(size=(64, 6)) * np.array([1, 2, 3, 0.5, 1, 4]) + 1.0
    y = g.integers(0, 4, 64)
    lr, wd, epochs, mom = 0.5, 1e-3, 5, 0.9
    probe = fit_linear(x, y, 4, lr, wd, epochs, batch_size, momentum=mom, seed=7)
    gen = torch.Generator().manual_seed(7)                                # the documented epoch order
    perms = [torch.randperm(64, generator=gen).numpy() for _ in range(epochs)]
    mean, std, w, b = numpy_linear(x, y, 4, lr, wd, epochs, batch_size, mom, perms)
    np.testing.assert_allclose(probe.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(probe.std.numpy(), std, rtol=1e-6)
    np.testing.assert_allclose(probe.weight.numpy(), w, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(probe.bias.numpy(), b, rtol=2e-4, atol=2e-5)
    assert np.abs(w).max() > 0.05                                         # it trained


def test_video_probabilities_average_softmax_over_views():
    g = np.random.default_rng(0)
    probe = fit_linear(g.normal(size=(30, 5)), g.integers(0, 3, 30), 3, 0.1, 0.0, 2, 8)
    feats = g.normal(size=(4, 6, 5)).astype(np.float32)
    z = (feats.astype(np.float64) - probe.mean.double().numpy()) / probe.std.double().numpy()
    logits = z @ probe.weight.double().numpy().T + probe.bias.double().numpy()
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(video_probabilities(probe, feats).numpy(), p.mean(1), rtol=1e-5)


def test_stratified_folds_spread_every_class():
    y = np.array([0] * 10 + [1] * 3 + [2] * 7 + [3])
    fold = stratified_folds(y, 5, seed=0)
    assert fold.shape == y.shape and set(fold.tolist()) == set(range(5))
    for c in range(4):                                   # a class puts n // 5 or one more in each fold
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1, (c, counts)
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(y)
    assert np.array_equal(fold, stratified_folds(y, 5, seed=0))
    assert not np.array_equal(fold, stratified_folds(y, 5, seed=1))
    with pytest.raises(MohicoError, match="6 folds need 2 <= folds <= the 5 train videos"):
        stratified_folds(np.arange(5), 6)


def test_linear_search_by_folds_matches_a_hand_computed_cross_validation():
    """The k-fold search against a second computation: each setting fitted on 4 folds, scored on the
    fifth with numpy's argmax of the mean view softmax, correct counts pooled; then the refit."""
    train, test = blobs(8, 3, 2, 6, 4, spread=1.2, prefix="tr"), blobs(4, 3, 2, 6, 5, spread=1.2, prefix="te")
    lrs, wds = (0.003, 0.3), (0.0, 0.1)
    res = P.linear(train, test, lrs=lrs, weight_decays=wds, epochs=15, batch_size=8, folds=4, seed=3)
    y = np.array([int(lab[5:]) for lab in train.labels])
    fold = stratified_folds(y, 4, seed=3)
    expected = []
    for lr in lrs:
        for wd in wds:
            correct = 0
            for f in range(4):
                tr, ho = fold != f, fold == f
                probe = fit_linear(train.feats[tr].reshape(-1, 6), np.repeat(y[tr], 2), 3, lr, wd, 15, 8, seed=3)
                z = (train.feats[ho].astype(np.float64) - probe.mean.double().numpy()) / probe.std.double().numpy()
                logits = z @ probe.weight.double().numpy().T + probe.bias.double().numpy()
                p = np.exp(logits - logits.max(-1, keepdims=True))
                correct += int(((p / p.sum(-1, keepdims=True)).mean(1).argmax(1) == y[ho]).sum())
            expected.append({"lr": lr, "weight_decay": wd, "val_top1": correct / len(y)})
    assert res["search"] == expected and res["folds"] == 4
    vals = [e["val_top1"] for e in expected]
    assert len(set(vals)) > 1                            # the settings do differ on these blobs
    best = expected[vals.index(max(vals))]
    assert (res["lr"], res["weight_decay"]) == (best["lr"], best["weight_decay"])
    one = P.linear(train, test, lrs=lrs, weight_decays=wds, epochs=15, batch_size=8, folds=1, seed=3)
    assert one["folds"] == 1 and one["val_fraction"] == 0.2
    with pytest.raises(MohicoError, match="folds must be >= 1"):
        P.linear(train, test, lrs=lrs, weight_decays=wds, folds=0)


def test_stratified_holdout():
    y = np.array([0] * 10 + [1] * 3 + [2])
    held = stratified_holdout(y, 0.2, seed=0)
    assert held[:10].sum() == 2 and held[10:13].sum() == 1 and not held[13]
    assert np.array_equal(held, stratified_holdout(y, 0.2, seed=0))


def blobs(n_per_class, classes, views, dim, seed, spread=0.3, prefix="v"):
    """Class-centred Gaussian views: a FeatureSet a linear classifier separates."""
    g = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    feats = centres[labels][:, None, :] + spread * g.normal(size=(len(labels), views, dim))
    feats /= np.linalg.norm(feats, axis=2, keepdims=True)
    keys = [f"{prefix}{i}" for i in range(len(labels))]
    return FeatureSet(keys, keys, [f"class{c}" for c in labels], feats.astype(np.float32))


def test_linear_protocol_separates_blobs_and_searches():
    train, test = blobs(12, 4, 3, 16, 0, prefix="tr"), blobs(5, 4, 3, 16, 1, prefix="te")
    res = P.linear(train, test, lrs=(1e-4, 0.5), weight_decays=(0.0,), epochs=30, batch_size=32)
    assert res["top1"] == 1.0 and res["top5"] == 1.0 and res["num_classes"] == 4
    assert [r["lr"] for r in res["search"]] == [1e-4, 0.5]
    # noisy blobs: the settings differ on the held-out videos; the first best one is refit
    noisy, noisy_test = blobs(12, 4, 2, 16, 2, spread=1.5, prefix="tr"), blobs(5, 4, 2, 16, 3, spread=1.5, prefix="te")
    res2 = P.linear(noisy, noisy_test, lrs=(1e-3, 0.3), weight_decays=(0.0, 0.3), epochs=20, batch_size=16)
    vals = [r["val_top1"] for r in res2["search"]]
    best = res2["search"][vals.index(max(vals))]
    assert (res2["lr"], res2["weight_decay"]) == (best["lr"], best["weight_decay"]) and len(vals) == 4
    assert res["train_views"] == 48 * 3 and len(res["per_video"]) == 20
    # shuffled labels: no better than chance on held-out data (the probe cannot memorise the test set)
    rnd = FeatureSet(test.keys, test.sources, list(np.random.default_rng(5).permutation(test.labels)), test.feats)
    assert P.linear(train, rnd, lrs=(0.5,), weight_decays=(0.0,), epochs=30)["top1"] < 0.6
    with pytest.raises(MohicoError, match="also train videos"):
        P.linear(train, train, lrs=(0.5,), weight_decays=(0.0,))


def test_retrieval_and_knn_protocols_on_featuresets():
    train, test = blobs(6, 3, 2, 8, 0, spread=0.05, prefix="a"), blobs(4, 3, 2, 8, 1, spread=0.05, prefix="b")
    res = P.retrieval(train, test, ks=(1, 5))
    assert res["recall@1"] == 1.0 and res["leave_one_out"] == 0
    assert all(r["label"] == r["nearest_label"] for r in res["per_video"])
    # the same set as both: a video never retrieves itself (the reference with the diagonal excluded)
    classes = sorted(set(train.labels))
    y = np.array([classes.index(c) for c in train.labels])
    vf = train.video_features()
    same = P.retrieval(train, train, ks=(1, 5))
    assert same["leave_one_out"] == len(train)
    ref = numpy_recall(vf, y, vf, y, (1, 5), np.eye(len(train), dtype=bool))
    assert same["recall@1"] == pytest.approx(ref["recall@1"]) and same["recall@5"] == pytest.approx(ref["recall@5"])
    k = P.knn(train, test, k=3)
    assert k["top1"] == 1.0 and k["num_test"] == 12


class CountingColour(nn.Module):
    """Mean/std colour of the clip (informative on the synthetic palettes); counts forward calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1) * self.scale


def test_features_multi_view_cache_and_eval_time_labels(synth_shards, synth_videos, tmp_path):
    cfg = load_config(CONFIG)
    net = CountingColour()
    fs = extract_features(net, cfg, synth_shards, clips_per_video=2, spatial_crops=3, batch_size=4,
                          cache_dir=tmp_path)
    assert fs.feats.shape == (6, 6, 6) and all(lab is None for lab in fs.labels)     # shards without labels
    np.testing.assert_allclose(np.linalg.norm(fs.feats, axis=2), 1.0, rtol=1e-5)
    # three crops of a 4:3 frame differ; the cached second extraction runs no forward pass
    assert not np.allclose(fs.feats[:, 0], fs.feats[:, 1])
    calls = net.calls
    again = extract_features(net, cfg, synth_shards, clips_per_video=2, spatial_crops=3, cache_dir=tmp_path)
    assert net.calls == calls and np.array_equal(again.feats, fs.feats) and again.keys == fs.keys
    with torch.no_grad():
        net.scale.fill_(2.0)                                             # other weights: another cache entry
    extract_features(net, cfg, synth_shards, clips_per_video=2, spatial_crops=3, cache_dir=tmp_path)
    assert net.calls > calls
    # labels at eval time: by source name, no re-encode; unlabelled videos are skipped and counted
    labels = json.loads((synth_videos / "labels.json").read_text())
    part = dict(list(labels.items())[:5])
    got = fs.relabel(part).labelled()
    assert len(got) == 5 and got.unlabelled and sorted(got.labels) == sorted(part.values())
    with pytest.raises(MohicoError, match="--labels"):
        fs.labelled()


@pytest.mark.slow
def test_cli_retrieval_and_linear_end_to_end(synth_shards, synth_videos, tmp_path):
    from mohico.models.backbones import build_backbone
    from mohico.models.backbone_file import save_backbone

    ckpt = tmp_path / "b.pt"
    save_backbone(ckpt, "r3d_18", {"width": 8}, build_backbone("r3d_18", width=8))
    from _cli import run_cli_in_process

    def cli(args):   # `mohico eval ARGS`, in this process (the CLI's main: exit code, stdout, stderr)
        return run_cli_in_process(["eval", *args], ROOT, {"WANDB_MODE": "offline"})

    common = ["--config", str(CONFIG), "--train", str(synth_shards), "--labels", str(synth_videos / "labels.json"),
              "--cache", str(tmp_path / "cache")]
    out = tmp_path / "retrieval.json"
    res = cli(["retrieval", str(ckpt), "--val", str(synth_shards), "--out", str(out), "--recall-at", "1,5", *common])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recall@1" in res.stdout and "R@5" in res.stdout
    saved = json.loads(out.read_text())
    assert saved["protocol"] == "retrieval" and saved["num_test"] == 6 and saved["leave_one_out"] == 6
    assert saved["retrieval_protocol"] == "coclr-centred" and "retrieval (coclr-centred)" in res.stdout
    assert 0 <= saved["recall@1"] <= saved["recall@5"] <= 1
    assert list((tmp_path / "wandb").glob("offline-run-*")), "results not logged to W&B"
    # W&B ran in this process: its service's address must not stay in the environment that later
    # subprocesses inherit (they would log through this process's service)
    assert "WANDB_SERVICE" not in os.environ
    # --no-center: plain cosine, named in the JSON and the table (features from the cache)
    res = cli(["retrieval", str(ckpt), "--val", str(synth_shards), "--out", str(out), "--no-center", "--no-wandb",
               *common])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.read_text())["retrieval_protocol"] == "uncentred" and "uncentred" in res.stdout
    # linear: disjoint sets (one shard trains, the other tests); 2 clips x 3 crops per video
    shards = sorted(synth_shards.glob("*.tar"))
    assert len(shards) == 2
    out = tmp_path / "linear.json"
    lin = ["linear", str(ckpt), "--config", str(CONFIG), "--labels", str(synth_videos / "labels.json"),
                  "--train", str(shards[0]), "--val", str(shards[1]), "--out", str(out), "--epochs", "3",
                  "--lr", "0.1", "--wd", "0", "--clips-per-video", "2", "--no-wandb"]
    res = cli(lin)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["protocol"] == "linear" and saved["views_per_video"] == 6 and saved["lr"] == 0.1
    assert saved["num_train"] + saved["num_test"] == 6 and 0 <= saved["top1"] <= saved["top5"] <= 1
    assert "top-1" in res.stdout and "linear" in res.stdout
    # the same shards as train and test: refused with the fix
    res = cli(lin[:6] + ["--train", str(synth_shards), "--val", str(synth_shards), "--epochs", "1", "--no-wandb"])
    assert res.returncode == 1 and "disjoint" in res.stderr, res.stderr[-2000:]
