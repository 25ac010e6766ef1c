"""Fine-tuning: labels by video id, the loss against an independent cross-entropy, the trainer
hooks, and `mohico eval finetune` end to end on a fabricated UCF101 split (DeepSpeed engine,
checkpoint, resume, W&B, multi-clip test accuracy)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.config import load_config
from mohico.errors import MohicoError
from mohico.datasets.synthetic.benchmark_synth import synth_benchmark
from mohico.datasets.load.sampling import stable_hash
from mohico.errors import ConfigError
from mohico.datasets.sample_schema import scan_labels
from mohico.eval.finetune import IGNORE, FinetuneModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "finetune_tiny_cpu.yaml"


def test_module_labels_loss_and_hooks(synth_shards, synth_videos):
    labels = json.loads((synth_videos / "labels.json").read_text())
    part = dict(list(labels.items())[:5])                       # one video left unlabelled
    lab_file = synth_shards.parent / "part_labels.json"
    lab_file.write_text(json.dumps(part))
    by_key = scan_labels(synth_shards, part)
    assert len(by_key) == 5 and sorted(by_key.values()) == sorted(part.values())
    cfg = load_config(CONFIG, [f"data.shards={synth_shards}", f"finetune.labels={lab_file}", "finetune.dropout=0"])
    torch.manual_seed(0)
    m = FinetuneModule(cfg)
    classes = sorted(set(part.values()))
    assert m.classes == classes and m.head.out_features == len(classes)
    keys = list(by_key) + ["not-a-video"]
    ids = torch.tensor([stable_hash(k) >> 1 for k in keys])
    want = [classes.index(by_key[k]) for k in keys[:-1]] + [IGNORE]
    assert m.labels_of(ids).tolist() == want
    clips = torch.randn(len(keys), 2, 3, cfg.data.clip_len, cfg.data.crop_size, cfg.data.crop_size)
    loss, terms = m(clips, None, 0.0, video_id=ids)
    # reference: float64 log-softmax of the same logits, mean over the labelled views only
    with torch.no_grad():
        logits = m.logits(clips.flatten(0, 1)).double().numpy()
    y = np.repeat(want, 2)
    lsm = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    ok = y != IGNORE
    ref = -lsm[ok][np.arange(ok.sum()), y[ok]].mean()
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    assert float(terms["finetune/unlabelled_frac"]) == pytest.approx(2 / 12)
    assert float(terms["finetune/top1"]) == pytest.approx(float(np.mean(logits[ok].argmax(1) == y[ok])))
    loss.backward()
    assert m.head.weight.grad is not None and m.backbone.stem[0].weight.grad is not None
    from mohico.trainer.states import BanksState

    banks = BanksState(m)                   # no bank: nothing saved, nothing to reshard
    assert banks.state_dict() == {}
    banks.reshard([{}, {}], step=3)
    banks.load_state_dict({})
    with pytest.raises(MohicoError, match="other objectives"):
        banks.load_state_dict({"mcl": {}})
    with pytest.raises(ConfigError, match="num_classes"):
        FinetuneModule(load_config(CONFIG, [f"data.shards={synth_shards}", f"finetune.labels={lab_file}",
                                            "finetune.num_classes=7"]))


@pytest.mark.slow
def test_eval_finetune_end_to_end_with_resume(tmp_path):
    tree = tmp_path / "ucf"
    synth_benchmark(tree, "ucf101", classes=3, per_class=3, seed=2, size=(76, 56), duration=2.4)
    env = {**os.environ, "WANDB_MODE": "offline"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mohico", *map(str, args)], capture_output=True, text=True,
                              timeout=600, cwd=ROOT, env=env)

    shards = tmp_path / "shards"
    res = cli("shards", tree / "UCF-101", shards, "--layout", "ucf101", "--splits", tree / "ucfTrainTestlist",
              "--short-side", 56, "--workers", 1, "--quiet", "--flow", "dis-fast")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "ft"
    base = ["eval", "finetune", "random", "--config", CONFIG, "--train", shards / "split1" / "train",
            "--val", shards / "split1" / "test", "--nproc", 1, "--set", f"run.dir={run_dir}",
            "--set", "checkpoint.every_steps=2", "--set", "trainer.log_every=2"]
    res = cli(*base, "--set", "trainer.max_steps=2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    first = json.loads((run_dir / "finetune_test.json").read_text())
    assert first["step"] == 2 and first["num_test"] == 3 and first["num_classes"] == 3
    assert first["clips_per_video"] == 2 and first["spatial_crops"] == 3
    hits = [r["label"] == r["pred"] for r in first["per_video"]]
    assert first["top1"] == pytest.approx(np.mean(hits)) and first["top5"] == 1.0
    assert "top-1" in res.stdout
    # longer: resumes from step 2 in the same run directory (same W&B run), tests again at step 4
    res = cli(*base, "--set", "trainer.max_steps=4")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    log = (run_dir / "logs" / "train_rank0.log").read_text()
    assert "resumed from" in log
    assert json.loads((run_dir / "finetune_test.json").read_text())["step"] == 4
    rows = [json.loads(r) for r in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("finetune/top1" in r for r in rows if r["step"] % 2 == 0)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len({p.name.rsplit("-", 1)[1] for p in runs}) == 1               # one W&B run id throughout
    assert any(b"eval/finetune/top1" in f.read_bytes() for p in runs for f in p.glob("*.wandb"))
    # the fine-tuned backbone exports like a pretrained one
    res = cli("export", run_dir, tmp_path / "ft_backbone.pt", "--format", "mohico")
    assert res.returncode == 0, res.stderr[-2000:]


def test_module_learns_constant_colour_classes(synth_shards, synth_videos):
    """The fine-tune path's pieces that `mohico train` wires (FinetuneModule with its labels by video
    id, dropout, the config's optimizer over ``param_groups`` and the ``lr_at`` schedule) learn a
    task whose label is a clip's colour: the train loss falls far below ln(C) and held-out clips
    are all classified right. Guards against a flat loss from plumbing (a part missing from the
    optimizer, lr 0, labels not aligned with the clips): the motion findings of
    benchmarks/reports/2026-11-25-motion-benchmark-ablation.md."""
    from mohico.trainer.optim import build_optimizer, lr_at, set_lr

    steps = 40
    lab_file = synth_videos / "labels.json"
    cfg = load_config(CONFIG, ["data.shards=" + str(synth_shards), f"finetune.labels={lab_file}", "optim.name=adamw", "optim.lr=0.002",
                               "optim.weight_decay=0.0001", f"trainer.max_steps={steps}", "trainer.steps_per_epoch=20"])
    torch.manual_seed(0)
    m = FinetuneModule(cfg)
    opt = build_optimizer(cfg, m)
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in m.parameters() if p.requires_grad)    # each once, head too
    by_key = scan_labels(synth_shards, json.loads(lab_file.read_text()))
    keys = sorted(by_key)
    ids = torch.tensor([stable_hash(k) >> 1 for k in keys])
    y = torch.tensor([m.classes.index(by_key[k]) for k in keys])
    c = len(m.classes)
    assert c >= 2
    colours = torch.linspace(-1.5, 1.5, c)[:, None] * torch.tensor([1.0, -1.0, 0.5])   # (C, 3), distinct per class
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.data.clip_len, cfg.data.crop_size, cfg.data.crop_size)

    def clips_of(classes: torch.Tensor, views: int) -> torch.Tensor:    # (B, V, 3, T, H, W)
        base = colours[classes][:, None, :, None, None, None]
        return base + 0.5 * torch.randn(len(classes), views, 3, *shape, generator=gen)

    m.train()
    losses = []
    for step in range(steps):
        set_lr(opt, lr_at(step, cfg, 1))
        loss, _ = m(clips_of(y, 2), None, step / steps, video_id=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[:3]) > 0.8 * np.log(c)                     # starts at chance ...
    assert np.mean(losses[-5:]) < 0.3, losses                        # ... and learns
    m.eval()
    test_y = torch.arange(c).repeat(4)
    with torch.no_grad():
        pred = m.logits(clips_of(test_y, 1)[:, 0]).argmax(1)
    assert pred.tolist() == test_y.tolist()
