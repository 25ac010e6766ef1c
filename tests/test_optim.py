"""Optimizers and the learning-rate schedule against float64 references."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from mohico.config import load_config
from mohico.trainer.optim import LARS, base_lr, build_optimizer, lr_at, param_groups, set_lr
from _dist import run_gloo


def cfg_with(*overrides):
    return load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", *overrides])


def test_warmup_cosine_schedule_points():
    cfg = cfg_with("optim.lr=0.1", "optim.warmup_epochs=2", "trainer.steps_per_epoch=5", "trainer.max_steps=30",
                   "optim.warmup_start_factor=0.01", "optim.min_lr=0.001")
    lr = [lr_at(s, cfg, world_size=1) for s in range(31)]
    assert lr[0] == pytest.approx(0.1 * 0.01)
    assert lr[5] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert lr[10] == pytest.approx(0.1)                                   # end of warm-up = peak
    assert lr[20] == pytest.approx((0.1 + 0.001) / 2)                     # half-way down the cosine
    assert lr[30] == pytest.approx(0.001)                                 # floor at max_steps
    for s in range(10, 31):                                               # float64 cosine reference
        ref = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * (s - 10) / 20))
        assert lr[s] == pytest.approx(ref, rel=1e-12)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11])) and all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_warmup_from_an_absolute_start_lr():
    """HiCo's warm-up (SlowFast ``lr_policy.get_lr_at_epoch``): linear from ``WARMUP_START_LR`` (0.001,
    not scaled with the batch) to the peak; ``warmup_start_lr: 0`` keeps ``lr * warmup_start_factor``."""
    common = ("optim.lr=0.3", "optim.scale_lr_with_batch=true", "data.batch_size=32", "optim.warmup_epochs=2",
              "trainer.steps_per_epoch=5", "trainer.max_steps=30", "optim.min_lr=0.0")
    cfg = cfg_with(*common, "optim.warmup_start_lr=0.001")
    peak = 0.3 * 8 * 32 / 256
    for s in range(10):
        assert lr_at(s, cfg, world_size=8) == pytest.approx(0.001 + (peak - 0.001) * s / 10, rel=1e-12)
    assert lr_at(10, cfg, world_size=8) == pytest.approx(peak, rel=1e-12)
    factor = cfg_with(*common, "optim.warmup_start_factor=0.1")
    assert factor.optim.warmup_start_lr == 0.0
    assert lr_at(0, factor, world_size=8) == pytest.approx(0.1 * peak, rel=1e-12)
    assert lr_at(5, factor, world_size=8) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-12)


def test_lr_scales_with_global_batch():
    cfg = cfg_with("optim.lr=0.3", "optim.scale_lr_with_batch=true", "data.batch_size=8", "trainer.grad_accum=2")
    assert base_lr(cfg, world_size=4) == pytest.approx(0.3 * 64 / 256)
    assert base_lr(cfg_with("optim.lr=0.3"), world_size=4) == 0.3


@pytest.mark.parametrize("objectives,clips", [(("objectives.hico.weight=1", "objectives.mcl.weight=0"), 3),
                                              (("objectives.hico.weight=1",), 3),
                                              ((), 2), (("objectives.mcl.variant=official",), 4)])
def test_lr_scaled_in_clips_is_the_official_hico_rule(objectives, clips):
    """Official HiCo (``OPTIMIZER.ADJUST_LR``): ``BASE_LR * NUM_GPUS * BATCH_SIZE * NUM_CLIPS_PER_VIDEO
    / 256``; mohico's global batch also counts gradient accumulation."""
    cfg = cfg_with("optim.lr=0.3", "optim.scale_lr_with_batch=true", "optim.scale_lr_unit=clips",
                   "data.batch_size=32", *objectives)
    assert cfg.objectives.num_views == clips
    assert base_lr(cfg, world_size=8) == pytest.approx(0.3 * 8 * 32 * clips / 256, rel=1e-12)
    accum = cfg_with("optim.lr=0.3", "optim.scale_lr_with_batch=true", "optim.scale_lr_unit=clips",
                     "data.batch_size=8", "trainer.grad_accum=2", *objectives)
    assert base_lr(accum, world_size=4) == pytest.approx(0.3 * 4 * 8 * 2 * clips / 256, rel=1e-12)
    videos = cfg_with("optim.lr=0.3", "optim.scale_lr_with_batch=true", "data.batch_size=32", *objectives)
    assert videos.optim.scale_lr_unit == "videos"
    assert base_lr(videos, world_size=8) == pytest.approx(0.3 * 8 * 32 / 256, rel=1e-12)


def test_the_hico_paper_config_reaches_the_official_lr():
    from pathlib import Path

    hico = load_config(Path(__file__).resolve().parents[1] / "configs" / "hico_s3d_uk400.yaml")
    assert (hico.optim.scale_lr_with_batch, hico.optim.scale_lr_unit, hico.objectives.num_views) == (True, "clips", 3)
    assert base_lr(hico, world_size=8) == pytest.approx(0.9, rel=1e-12)         # 0.3 * 8 * 32 * 3 / 256


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3)
        self.bn = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 5)
        self.key = copy.deepcopy(self.fc).requires_grad_(False)      # a momentum encoder: not optimised


def test_param_groups_exclude_bias_norm_and_frozen():
    net = Net()
    groups = param_groups(net, weight_decay=0.1)
    decay, no_decay = groups
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.fc.bias)}
    per = param_groups(net, 0.1, per_parameter=True)
    assert len(per) == 6 and [g["lars"] for g in per] == [p.ndim >= 2 for g in per for p in g["params"]]
    assert not any(p is q for g in per for p in g["params"] for q in net.key.parameters())


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_decay_norm_and_bias_decays_every_trainable_parameter(name):
    net = Net()
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    opt = build_optimizer(cfg_with(f"optim.name={name}", "optim.weight_decay=0.1", "optim.decay_norm_and_bias=true"),
                          net)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == trainable and len(trainable) == 6
    if name == "lars":                                   # layer-wise adaptation stays on weights only
        assert [g["lars"] for g in opt.param_groups] == [p.ndim >= 2 for g in opt.param_groups for p in g["params"]]
    default = build_optimizer(cfg_with(f"optim.name={name}", "optim.weight_decay=0.1"), net)
    exempt = {id(p) for g in default.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert exempt == {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.fc.bias)}


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)])
def test_build_optimizer_and_set_lr(name, cls):
    opt = build_optimizer(cfg_with(f"optim.name={name}"), Net())
    assert isinstance(opt, cls)
    set_lr(opt, 0.123)
    assert all(g["lr"] == 0.123 for g in opt.param_groups)


def lars_reference(ws, grads, lr, mom, wd, eta, lars_flags, eps=1e-8, nesterov=False):
    """float64 numpy LARS: per layer trust = eta |w| / (|g| + wd |w| + eps), momentum SGD. With
    ``nesterov``, Nesterov momentum from its definition (Sutskever et al. 2013, PyTorch's form): the
    velocity ``v_t = mom v_{t-1} + d_t`` (``v_1 = d_1``) and the step ``w_t = w_{t-1} - lr (d_t + mom v_t)``,
    a look-ahead along the updated velocity."""
    ws = [w.astype(np.float64).copy() for w in ws]
    bufs = [None] * len(ws)
    for step_grads in grads:
        for i, (w, g) in enumerate(zip(ws, step_grads)):
            g = g.astype(np.float64)
            d = g
            if lars_flags[i]:
                wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                trust = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
                d = (g + wd * w) * trust
            bufs[i] = d.copy() if bufs[i] is None else mom * bufs[i] + d
            ws[i] = w - lr * (d + mom * bufs[i] if nesterov else bufs[i])
    return ws


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_float64_reference(nesterov):
    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(cfg_with("optim.name=lars", "optim.weight_decay=0.01", "optim.lars_eta=0.02",
                                   "optim.momentum=0.9", f"optim.nesterov={str(nesterov).lower()}"), net)
    set_lr(opt, 0.5)
    params = [p for g in opt.param_groups for p in g["params"]]
    flags = [g["lars"] for g in opt.param_groups]
    w0 = [p.detach().numpy().copy() for p in params]
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(4)]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g)
        opt.step()
    ref = lars_reference(w0, grads, 0.5, 0.9, 0.01, 0.02, flags, nesterov=nesterov)
    other = lars_reference(w0, grads, 0.5, 0.9, 0.01, 0.02, flags, nesterov=not nesterov)
    for p, r, q in zip(params, ref, other):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-5, atol=1e-6)
        assert np.abs(r - q).max() > 1e-3                     # the two momentum forms differ here
    assert any(flags) and not all(flags)


def test_sgd_takes_the_nesterov_flag():
    """PyTorch's SGD has Nesterov momentum of its own: the key reaches it."""
    assert all(g["nesterov"] for g in build_optimizer(cfg_with("optim.name=sgd", "optim.nesterov=true"), Net()).param_groups)
    assert not any(g["nesterov"] for g in build_optimizer(cfg_with("optim.name=sgd"), Net()).param_groups)


@pytest.mark.parametrize("overrides,key", [(("optim.name=adamw", "optim.nesterov=true"), "optim.nesterov"),
                                           (("optim.momentum=0", "optim.nesterov=true"), "optim.nesterov"),
                                           (("optim.warmup_start_lr=-0.1",), "optim.warmup_start_lr")])
def test_bad_nesterov_or_start_lr_is_refused_naming_the_key(overrides, key):
    from mohico.config_validate import validate
    from mohico.errors import ConfigError
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg_with(*overrides))


def _partitioned_worker(rank, world):
    torch.manual_seed(0)
    full = [torch.randn(6, 5), torch.randn(7)]                       # a weight and a bias
    grads = [[torch.randn(6, 5), torch.randn(7)] for _ in range(2)]
    # ZeRO-style: each rank owns a flat slice of every group (rank 1's slice is zero-padded)
    def part(t):
        flat = t.flatten()
        n = (flat.numel() + 1) // 2
        padded = torch.cat([flat, flat.new_zeros(2 * n - flat.numel())])
        return padded[rank * n:(rank + 1) * n].clone()
    mine = [nn.Parameter(part(t)) for t in full]
    groups = [{"params": [mine[0]], "weight_decay": 0.1, "lars": True},
              {"params": [mine[1]], "weight_decay": 0.0, "lars": False}]
    opt = LARS(groups, lr=0.3, momentum=0.9, weight_decay=0.1, eta=0.05, partitioned=True)
    whole = [nn.Parameter(t.clone()) for t in full]
    ref = LARS([{"params": [whole[0]], "weight_decay": 0.1, "lars": True},
                {"params": [whole[1]], "weight_decay": 0.0, "lars": False}],
               lr=0.3, momentum=0.9, weight_decay=0.1, eta=0.05, partitioned=False)
    for g in grads:
        for p, q, gg in zip(mine, whole, g):
            p.grad = part(gg)
            q.grad = gg.clone()
        opt.step()
        ref.step()
    for p, q in zip(mine, whole):
        torch.testing.assert_close(p.detach(), part(q.detach()), rtol=1e-6, atol=1e-7)
    return rank


@pytest.mark.slow
def test_lars_partitioned_over_two_ranks_equals_whole_layers():
    """Under ZeRO 1/2 each group is a per-rank slice of one layer: the norms are all-reduced."""
    assert run_gloo(_partitioned_worker, 2) == [0, 1]
