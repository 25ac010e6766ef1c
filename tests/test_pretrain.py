"""PretrainModule on a tiny backbone (r3d_18 width 8, 4 x 32 x 32 clips): forward/backward with
MCL (+MAL) and HiCo, logged terms, gradients where they belong, banks kept out of the
state_dict and round-tripped per rank, resharding, momentum update, input/config errors."""
from __future__ import annotations

import pytest
import torch

from mohico.config import Config
from mohico.config_validate import validate
from mohico.errors import ConfigError, MohicoError
from mohico.models.bank import MemoryBank
from mohico.models.pretrain import PretrainModule
from mohico.trainer.states import BanksState


def _cfg(mcl=1.0, hico=0.0, **extra) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.backbone_options, cfg.model.proj_dim = "r3d_18", {"width": 8}, 16
    cfg.bank.size, cfg.bank.dim = 64, 16
    cfg.objectives.mcl.weight, cfg.objectives.hico.weight = mcl, hico
    cfg.trainer.max_steps, cfg.trainer.steps_per_epoch = 100, 10
    cfg.objectives.mcl.mal.warmup_epochs = 1.0
    for key, value in extra.items():
        section, attr = key.split("__")
        setattr(getattr(cfg.objectives, section) if section in ("mcl", "hico") else getattr(cfg, section), attr, value)
    return cfg


def _batch(views, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, views, 3, 4, 32, 32, generator=g), torch.rand(b, views, 4, 8, 8, generator=g)


def test_mcl_only_forward_backward():
    torch.manual_seed(0)
    model = PretrainModule(_cfg())
    clips, motion = _batch(2)
    loss, terms = model(clips, motion, 0.05)                      # epoch 0.5: MAL warm-up weight
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss", "mcl/loss", "mcl/nce", "mcl/mal", "mcl/mal_st", "mcl/mal_s", "mcl/mal_t",
            "mcl/mal_weight", "mcl/bank_fill", "mcl/pos_sim", "mcl/neg_sim"} == set(terms)
    assert all(not v.requires_grad and v.ndim == 0 for v in terms.values())
    assert terms["mcl/mal_weight"].item() == 2.0
    assert terms["loss"].item() == pytest.approx(terms["mcl/nce"].item() + 2.0 * terms["mcl/mal"].item(), rel=1e-5)
    loss.backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.objectives["mcl"].proj.net[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.key_encoder.parameters())
    _, terms = model(*_batch(2, seed=1), 0.5)                      # epoch 5 > warm-up: weight 1, bank non-empty
    assert terms["mcl/mal_weight"].item() == 1.0 and terms["mcl/nce"].item() > 0
    assert terms["mcl/bank_fill"].item() == pytest.approx(4 / 64)


def test_mcl_and_hico_forward_backward_and_banks():
    torch.manual_seed(0)
    model = PretrainModule(_cfg(mcl=1.0, hico=0.5))
    clips, motion = _batch(3)
    loss, terms = model(clips, motion, 0.0)
    assert {"hico/visual", "hico/topical", "hico/topical_acc", "hico/bank_fill", "hico/loss", "mcl/nce"} <= set(terms)
    assert terms["loss"].item() == pytest.approx(terms["mcl/loss"].item() + 0.5 * terms["hico/loss"].item(), rel=1e-5)
    loss.backward()
    hico = model.objectives["hico"]
    for head in (hico.visual, hico.topical, hico.classifier):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    # banks: outside the state_dict, saved per rank by the trainer (trainer.states.BanksState over banks())
    assert not any("bank" in k for k in model.state_dict())
    assert any(k.startswith("key_encoder.backbone.") for k in model.state_dict())
    assert not any(".key_" in k for k in model.state_dict())           # no EMA part inside an objective
    states = BanksState(model).state_dict()
    assert set(states) == {"mcl", "hico"} and states["mcl"]["filled"] == 2 and states["hico"]["filled"] == 2
    other = PretrainModule(_cfg(mcl=1.0, hico=0.5))
    BanksState(other).load_state_dict(states)
    for name, bank in other.banks().items():
        torch.testing.assert_close(bank.ordered_keys(), model.banks()[name].ordered_keys())
    with pytest.raises(MohicoError, match="other objectives"):
        BanksState(PretrainModule(_cfg())).load_state_dict(states)
    for name, state in states.items():                                # 1 -> 2 -> 1 ranks (BanksState.reshard's step)
        two = MemoryBank.reshard([state], 2)
        assert [s["world_size"] for s in two] == [2, 2] and sum(s["filled"] for s in two) == 2
        back = MemoryBank.reshard(two, 1)[0]
        torch.testing.assert_close(back["keys"][:2], model.banks()[name].ordered_keys())


def test_momentum_update_and_no_grad_forward():
    torch.manual_seed(0)
    model = PretrainModule(_cfg(mcl__momentum=0.5))
    key = model.key_encoder.backbone
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in key.parameters()]
    model.momentum_update()
    for old, new, q in zip(before, key.parameters(), model.backbone.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * q)
    with torch.no_grad():                                          # evaluation: no double backprop, no MAL
        loss, terms = model(*_batch(2), 0.0)
    assert torch.isfinite(loss) and "mcl/mal" not in terms
    filled = model.banks()["mcl"].filled
    model.eval()
    with torch.no_grad():
        model(*_batch(2), 0.0)
    assert model.banks()["mcl"].filled == filled                  # evaluation leaves the bank alone


def _ema_update_ok(ema, online_before, ema_before, m):
    for e, q, k in zip(ema.parameters(), online_before, ema_before):
        torch.testing.assert_close(e, m * k + (1 - m) * q)


@pytest.mark.parametrize("mcl", [1.0, 0.0])
def test_hico_bank_keys_from_the_ema_encoder_one_ema_backbone(mcl):
    torch.manual_seed(0)
    model = PretrainModule(_cfg(mcl=mcl, hico=1.0, mcl__momentum=0.5, hico__momentum=0.25, mcl__mal_enabled=False))
    hico, key = model.objectives["hico"], model.key_encoder
    backbone_type = type(model.backbone)
    ema_backbones = [n for n, m in model.named_modules() if isinstance(m, backbone_type) and n != "backbone"]
    assert ema_backbones == ["key_encoder.backbone"]
    assert sorted(key.heads) == (["hico", "mcl"] if mcl else ["hico"])
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_heads = sum(p.numel() for p in hico.visual.parameters()) + \
        (sum(p.numel() for p in model.objectives["mcl"].proj.parameters()) if mcl else 0)
    assert n_frozen == n_backbone + n_heads                              # exactly one EMA backbone
    assert any(k.startswith("key_encoder.heads.hico.") for k in model.state_dict())
    # momentum_update: the (shared) backbone copy with MCL's momentum when MCL is on, HiCo's head with HiCo's
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    snap = [[p.clone() for p in m.parameters()] for m in (model.backbone, key.backbone, hico.visual, key.heads["hico"])]
    model.momentum_update()
    _ema_update_ok(key.backbone, snap[0], snap[1], 0.5 if mcl else 0.25)
    _ema_update_ok(key.heads["hico"], snap[2], snap[3], 0.25)
    # the keys enqueued into HiCo's bank = EMA head over the EMA backbone's embedding of v_j
    clips, motion = _batch(3, b=3)
    loss, terms = model(clips, motion, 0.0)
    loss.backward()
    assert all(p.grad is None for p in key.parameters()) and terms["hico/bank_fill"].item() == 3 / 64
    with torch.no_grad():                                          # shuffle BN is the identity at world 1
        expected = torch.nn.functional.normalize(key.heads["hico"](key.backbone(clips[:, 1])), dim=1)
    torch.testing.assert_close(model.banks()["hico"].ordered_keys(), expected)


def test_key_encoder_loads_checkpoints_from_before_it_was_shared():
    """Module state written when the EMA parts lived in the objectives (objectives.mcl.key_backbone,
    .key_proj, objectives.hico.key_visual / .key_backbone) loads into the shared key encoder."""
    for mcl, old_backbone in ((1.0, "objectives.mcl.key_backbone."), (0.0, "objectives.hico.key_backbone.")):
        torch.manual_seed(0)
        model = PretrainModule(_cfg(mcl=mcl, hico=1.0))
        with torch.no_grad():
            for p in model.key_encoder.parameters():
                p.add_(torch.randn_like(p))
        new = model.state_dict()
        old = {}
        for k, v in new.items():
            k = k.replace("key_encoder.backbone.", old_backbone).replace("key_encoder.heads.mcl.", "objectives.mcl.key_proj.")
            old[k.replace("key_encoder.heads.hico.", "objectives.hico.key_visual.")] = v.clone()
        assert not any(k.startswith("key_encoder.") for k in old)
        torch.manual_seed(1)
        fresh = PretrainModule(_cfg(mcl=mcl, hico=1.0))
        fresh.load_state_dict(old)                                        # strict: nothing missing or unexpected
        for k, v in fresh.state_dict().items():
            torch.testing.assert_close(v, new[k])


def test_feature_map_variant_and_sync_bn_at_world_one():
    torch.manual_seed(0)
    model = PretrainModule(_cfg(mcl__bn="sync"))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.backbone.modules())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.key_encoder.backbone.modules())
    model.objectives["mcl"].cfg.mal.variant = "feature_map"
    loss, terms = model(*_batch(2), 0.0)
    loss.backward()
    assert "mcl/mal" in terms and model.backbone.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mcl,mcl_bn,hico_bn,synced", [
    (0.0, "sync", "shuffle", False),     # MCL off: its bn setting asks for nothing
    (0.0, "shuffle", "sync", True),      # HiCo alone asks for SyncBN
    (1.0, "none", "sync", True),         # either objective asking is enough
    (1.0, "sync", "shuffle", True),
    (1.0, "shuffle", "shuffle", False)])
@pytest.mark.slow
def test_sync_bn_when_either_objective_asks(mcl, mcl_bn, hico_bn, synced):
    torch.manual_seed(0)
    model = PretrainModule(_cfg(mcl=mcl, hico=1.0, mcl__bn=mcl_bn, hico__bn=hico_bn, mcl__mal_enabled=False))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    hico = model.objectives["hico"]
    head_bns = [m for part in (hico.visual, hico.topical, model.key_encoder.heads["hico"]) for m in part.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(head_bns) == 6 and len(bns) > len(head_bns)
    assert all(isinstance(m, torch.nn.SyncBatchNorm) == synced for m in bns)   # backbone, EMA copies, heads
    assert model.key_encoder.shuffle == ((mcl_bn if mcl else hico_bn) == "shuffle")
    loss, _ = model(*_batch(3), 0.0)                     # world size 1: SyncBatchNorm runs as plain BN
    loss.backward()
    assert torch.isfinite(loss)


def test_errors():
    with pytest.raises(ConfigError, match="zero_stage"):
        PretrainModule(_cfg(trainer__zero_stage=3))
    with pytest.raises(ConfigError, match="zero_stage"):                 # HiCo's bank keys: an EMA encoder too
        PretrainModule(_cfg(mcl=0.0, hico=1.0, trainer__zero_stage=3))
    plain = PretrainModule(_cfg(mcl=0.0, hico=1.0, hico__use_bank=False, trainer__zero_stage=3))
    assert plain.key_encoder is None and all(p.requires_grad for p in plain.parameters())
    plain.momentum_update()                                               # no key encoder: nothing to update
    with pytest.raises(ConfigError, match="objectives.hico.momentum"):
        validate(_cfg(hico=1.0, hico__momentum=1.0))
    with pytest.raises(ConfigError, match="bank.size"):
        PretrainModule(_cfg(bank__size=0))
    model = PretrainModule(_cfg(mcl=0.0, hico=1.0))
    with pytest.raises(MohicoError, match="3 views"):
        model(*_batch(2), 0.0)
    with pytest.raises(MohicoError, match="motion"):
        PretrainModule(_cfg())(_batch(2)[0], None, 0.0)
    with pytest.raises(ConfigError, match="no objective"):
        PretrainModule(_cfg(mcl=0.0))
