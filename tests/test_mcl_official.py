"""MCL's official variant (``objectives.mcl.variant: official``, the released code's loss): three
positives per query against one bank, all three keys enqueued, the intra-video NCE through its own
head; each term against a float64 numpy loss written from its definition, and the views, key
encoder and config rules around it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mohico.config import Config
from mohico.config_validate import validate
from mohico.errors import ConfigError
from mohico.models.objectives import MCL
from mohico.models.pretrain import PretrainModule


def _cfg(variant: str = "official") -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.backbone_options, cfg.model.proj_dim = "r3d_18", {"width": 8}, 16
    cfg.bank.size, cfg.bank.dim = 32, 16
    cfg.objectives.mcl.weight, cfg.objectives.mcl.variant = 1.0, variant
    cfg.objectives.mcl.tau, cfg.objectives.mcl.tau_intra = 0.1, 0.2
    cfg.objectives.mcl.mal_enabled = False
    return cfg


class _Stub(torch.nn.Module):
    out_dim = 12


def _np_official(q, qi, k, ki, bank, bank_ids, ids, tau, tau_intra):
    """The definition, loop form: for each query i and positive j in (same clip, other 1, other 2):
    -log(e^{q.k_j/tau} / (e^{q.k_j/tau} + sum of e^{q.b/tau} over the bank keys b not of i's video)),
    averaged over the 3B rows; intra: for j in (other 1, other 2),
    -log(e^{q'.k'_0/tau'} / (e^{q'.k'_0/tau'} + e^{q'.k'_j/tau'})), averaged over the 2B rows."""
    b = q.shape[0]
    inter, intra = [], []
    for i in range(b):
        neg = [np.exp(q[i] @ bank[n] / tau) for n in range(len(bank)) if bank_ids[n] != ids[i]]
        for j in range(3):
            pos = np.exp(q[i] @ k[j, i] / tau)
            inter.append(-np.log(pos / (pos + sum(neg))))
        same = np.exp(qi[i] @ ki[0, i] / tau_intra)
        for j in (1, 2):
            intra.append(-np.log(same / (same + np.exp(qi[i] @ ki[j, i] / tau_intra))))
    return float(np.mean(inter)), float(np.mean(intra))


def test_official_terms_match_numpy_and_all_three_keys_are_enqueued():
    torch.manual_seed(0)
    mcl = MCL(_cfg(), _Stub()).double().train()
    b, d = 3, 16
    g = torch.Generator().manual_seed(1)
    bank_keys = F.normalize(torch.randn(10, d, generator=g, dtype=torch.float64), dim=1)
    bank_ids = torch.tensor([5, 7, 9, 5, 1, 2, 7, 3, 4, 9])
    mcl.bank.enqueue(bank_keys, ids=bank_ids)
    stored = mcl.bank.ordered_keys().double().numpy()                             # as the bank keeps them (fp32)
    emb = torch.randn(b, 1, 12, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(3, b, d, generator=g, dtype=torch.float64), dim=-1)
    ki = F.normalize(torch.randn(3, b, d, generator=g, dtype=torch.float64), dim=-1)
    keys = torch.cat([k.reshape(3 * b, d), ki.reshape(3 * b, d)], dim=1)         # (3B, 2d): inter | intra
    ids = torch.tensor([5, 7, 8])
    loss, terms = mcl(emb, keys, video_id=ids)
    with torch.no_grad():
        q, qi = mcl.proj(emb[:, 0]).numpy(), mcl.intra(emb[:, 0]).numpy()
    want_inter, want_intra = _np_official(q, qi, k.numpy(), ki.numpy(), stored, bank_ids.numpy(),
                                          ids.numpy(), 0.1, 0.2)
    assert terms["mcl/nce"].item() == pytest.approx(want_inter, rel=1e-10)
    assert terms["mcl/intra"].item() == pytest.approx(want_intra, rel=1e-10)
    assert loss.item() == pytest.approx(want_inter + want_intra, rel=1e-10)
    # the 3B keys were enqueued after the 10 old ones, in order (same clip, other 1, other 2), with their ids
    newest = mcl.bank.ordered_keys()[-3 * b:]
    torch.testing.assert_close(newest.double(), k.reshape(3 * b, d), rtol=0, atol=1e-7)
    assert mcl.bank.ids[10:10 + 3 * b].tolist() == ids.repeat(3).tolist()
    assert mcl.bank.filled == 10 + 3 * b
    # the gradient reaches both heads and is what autograd of the numpy-defined loss gives
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mcl.intra.parameters())


def test_official_with_an_empty_bank_has_no_inter_loss_and_eval_leaves_the_bank():
    mcl = MCL(_cfg(), _Stub()).double().eval()
    emb = torch.randn(2, 1, 12, dtype=torch.float64)
    keys = F.normalize(torch.randn(6, 32, dtype=torch.float64), dim=1)
    _, terms = mcl(emb, keys)
    assert terms["mcl/nce"].item() == 0.0 and mcl.bank.filled == 0


def test_pretrain_module_reads_four_views_and_updates_both_ema_heads():
    cfg = _cfg()
    cfg.objectives.mcl.momentum = 0.5
    assert cfg.objectives.num_views == 4 and _cfg("paper").objectives.num_views == 2
    torch.manual_seed(0)
    model = PretrainModule(cfg).double()
    assert model.key_views == (1, 2, 3) and set(model.key_encoder.heads["mcl"].state_dict()) == {
        *(f"proj.{k}" for k in model.objectives.mcl.proj.state_dict()),
        *(f"intra.{k}" for k in model.objectives.mcl.intra.state_dict())}
    clips = torch.randn(2, 4, 3, 4, 32, 32, dtype=torch.float64)
    loss, terms = model(clips, None, 0.1, video_id=torch.tensor([1, 2]))
    assert torch.isfinite(loss) and "mcl/intra" in terms and model.objectives.mcl.bank.filled == 6
    # the keys come from views 1, 2, 3: changing view 0 (the query) leaves the enqueued keys alone
    before = model.objectives.mcl.bank.ordered_keys().clone()
    model.objectives.mcl.bank.filled, model.objectives.mcl.bank.ptr = 0, 0
    other = clips.clone()
    other[:, 0] += 1.0
    model(other, None, 0.1, video_id=torch.tensor([1, 2]))
    torch.testing.assert_close(model.objectives.mcl.bank.ordered_keys(), before)
    old = [p.clone() for p in model.key_encoder.heads["mcl"].intra.parameters()]
    with torch.no_grad():
        for p in model.objectives.mcl.intra.parameters():
            p.add_(1.0)
    model.momentum_update()
    for o, ema, online in zip(old, model.key_encoder.heads["mcl"].intra.parameters(),
                              model.objectives.mcl.intra.parameters()):
        torch.testing.assert_close(ema, 0.5 * o + 0.5 * online)


def test_official_with_hico_is_refused_naming_the_key():
    cfg = _cfg()
    cfg.objectives.hico.weight = 1.0
    with pytest.raises(ConfigError, match="objectives.mcl.variant"):
        validate(cfg)
    validate(_cfg())


def test_the_sampler_draws_the_query_twice_and_two_keys_of_the_other_half():
    from mohico.datasets.load.sampling import ClipSampler

    cfg = _cfg()
    cfg.data.clip_len, cfg.data.frame_stride, cfg.data.reference_fps = 8, 1, 0
    cfg.sampling.mcl_temporal = "halves"
    sampler = ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False, views=4)
    meta = {"num_frames": 120, "fps": 15.0, "width": 64, "height": 64, "tmotion": list(np.linspace(0, 1, 120))}
    for i in range(100):
        st, _, _ = sampler.temporal(meta, np.random.default_rng(i))
        assert len(st) == 4 and st[0] == st[1]
        assert all((s < 60) != (st[0] < 60) and abs(int(s) - int(st[0])) >= 8 for s in st[2:])
    with pytest.raises(ValueError, match="2 or 4 views"):
        ClipSampler(cfg.sampling, cfg.data, mcl=True, hico=False, views=3)


def _np_nt_xent(z, ids, tau):
    """SimCLR's NT-Xent, loop form: rows i and i + B a positive pair; each row's negatives every
    other row except itself, its pair and other rows of its video; mean over the 2B rows."""
    n2, b = z.shape[0], z.shape[0] // 2
    out = []
    for i in range(n2):
        j = (i + b) % n2
        negs = [r for r in range(n2) if r not in (i, j) and ids[r % b] != ids[i % b]]
        pos = np.exp(z[i] @ z[j] / tau)
        out.append(-np.log(pos / (pos + sum(np.exp(z[i] @ z[r] / tau) for r in negs))))
    return float(np.mean(out))


@pytest.mark.slow
def test_in_batch_negatives_match_simclr_and_need_no_bank_nor_key_encoder():
    cfg = _cfg("paper")
    cfg.objectives.mcl.negatives = "batch"
    cfg.bank.size = 0
    validate(cfg)
    torch.manual_seed(0)
    mcl = MCL(cfg, _Stub()).double()
    assert mcl.bank is None and mcl.key_head is None and not mcl.needs_keys() and mcl.online_views == (0, 1)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(4, 2, 12, generator=g, dtype=torch.float64)
    ids = torch.tensor([1, 2, 1, 3])                     # videos 0 and 2 are one video: not each other's negatives
    loss, terms = mcl(emb, None, video_id=ids)
    with torch.no_grad():
        z = mcl.proj(emb.transpose(0, 1).reshape(8, 12)).numpy()
    assert loss.item() == pytest.approx(_np_nt_xent(z, ids.numpy(), 0.1), rel=1e-10)
    assert "mcl/bank_fill" not in terms
    # PretrainModule: no key encoder, no bank, both views through the online backbone
    model = PretrainModule(cfg).double()
    assert model.key_encoder is None and model.banks() == {} and model.online_views == [0, 1]
    loss, _ = model(torch.randn(2, 2, 3, 4, 32, 32, dtype=torch.float64), None, 0.1, video_id=torch.tensor([1, 2]))
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.parameters() if p.grad is not None) > 0
    with pytest.raises(ConfigError, match="objectives.mcl.negatives"):
        c = _cfg("official")
        c.objectives.mcl.negatives = "batch"
        validate(c)
