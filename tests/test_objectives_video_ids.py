"""Own-video negatives with ``batch.video_id``: HiCo's NT-Xent leaves out every clip of the
anchor's video (duplicates in the global batch included) and the bank keys of that video
(float64 numpy reference, gradcheck, 2 gloo ranks equal 1); the topical pairs are labelled by
video id; MCL's bank NCE masks and stores the ids; PretrainModule passes them through."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mohico.models.backbones import build_backbone
from mohico.models.bank import MemoryBank
from mohico.models.key_encoder import KeyEncoder
from mohico.models.objectives import HiCo, MCL
from mohico.models.objectives.hico import focal_loss, visual_consistency
from mohico.models.pretrain import PretrainModule
from _dist import run_gloo
from test_objectives import _cfg, _z


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _np_ntxent_ids(z, ids, keys, key_ids, tau):
    """Loop form: anchors v_i, v_j of each sample, positive the other one; negatives every clip
    of every sample of *another video id* and the bank keys of another video (or unknown -1)."""
    z = np.asarray(z, dtype=np.float64)
    b = z.shape[0]
    out = np.zeros(2 * b)
    for a_view in (0, 1):
        for v in range(b):
            anchor, positive = z[v, a_view], z[v, 1 - a_view]
            negatives = [z[o, c] for o in range(b) if ids[o] != ids[v] for c in range(3)]
            negatives += [k for k, i in zip(keys, key_ids) if i < 0 or i != ids[v]]
            pos = anchor @ positive / tau
            neg = np.array([anchor @ n / tau for n in negatives])
            out[a_view * b + v] = -pos + np.log(np.exp(pos) + np.exp(neg).sum())
    return out


def test_ntxent_masks_duplicate_videos_and_their_bank_keys():
    z = _z(5, 8, 0)
    ids = torch.tensor([11, 12, 11, 13, 12])                 # videos 11 and 12 sampled twice
    keys, key_ids = _unit(9, 8, 1), torch.tensor([11, 13, -1, 12, 11, 14, 13, 11, -1])
    bank = MemoryBank(16, 8, dtype=torch.float64)
    bank.enqueue(keys, ids=key_ids)
    loss = visual_consistency(z, 0.1, bank, video_id=ids)
    ref = _np_ntxent_ids(z.numpy(), ids.tolist(), keys.numpy(), key_ids.tolist(), 0.1)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)
    # without ids (old behaviour) the duplicates and own-video keys are negatives: a larger loss
    plain = visual_consistency(z, 0.1, bank)
    assert (plain[[0, 1, 2, 4]] > loss[[0, 1, 2, 4]]).all()
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: visual_consistency(x, 0.5, bank, video_id=ids), (zz,))


def test_topical_pairs_are_labelled_by_video_id():
    torch.manual_seed(0)
    cfg = _cfg(hico__weight=1.0, hico__use_bank=False)
    hico = HiCo(cfg, build_backbone("r3d_18", width=8)).double()
    emb = torch.randn(4, 3, hico.visual.net[0].in_features, dtype=torch.float64)
    ids = torch.tensor([5, 6, 5, 7])                          # samples 0 and 2: the same video
    _, terms = hico(emb, video_id=ids)
    with torch.no_grad():
        t = hico.topical(emb.reshape(12, -1))
        scores = hico.classifier.pairwise(t)
    same = np.repeat(ids.numpy(), 3)
    labels = np.array([[int(same[a] == same[b]) for b in range(12)] for a in range(12)])
    off = ~np.eye(12, dtype=bool)
    assert labels[off].sum() == 2 * 15 + 6 * 2                # video 5: 6 clips -> 30 ordered pairs; 6, 7: 6 each
    want = focal_loss(scores[torch.from_numpy(off)], torch.from_numpy(labels[off]), cfg.objectives.hico.focal_gamma)
    assert terms["hico/topical"].item() == pytest.approx(want.item(), rel=1e-10)


def test_mcl_masks_own_video_keys_and_stores_ids():
    torch.manual_seed(0)
    cfg = _cfg(mcl__weight=1.0, mcl__bn="none", mcl__mal_enabled=False)
    backbone = build_backbone("r3d_18", width=8)
    mcl = MCL(cfg, backbone)
    key = KeyEncoder(backbone, {"mcl": mcl.proj}, 0.999, {"mcl": 0.999}, shuffle=False)
    x_q, x_k = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 4, 32, 32)
    ids = torch.tensor([40, 41])
    mcl(backbone(x_q)[:, None], mcl.project_keys(key.heads["mcl"], key.embed(x_k)), video_id=ids)
    assert mcl.bank.filled_ids().tolist() == [40, 41]
    mcl.eval()                                                # bank untouched from here on
    key.eval()
    with torch.no_grad():
        q = mcl.proj(backbone(x_q))
        k = mcl.project_keys(key.heads["mcl"], key.embed(x_k))
        loss, _ = mcl(backbone(x_q)[:, None], k, video_id=ids)
        # each query's only other bank key is the other video's: a 2-way softmax
        bank = mcl.bank.filled_keys()
        want = [torch.logsumexp(torch.stack([q[i] @ k[i], q[i] @ bank[1 - i]]) / 0.1, 0) - q[i] @ k[i] / 0.1
                for i in range(2)]
    assert loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)


def test_pretrain_module_passes_video_ids_to_both_banks():
    torch.manual_seed(0)
    cfg = _cfg(mcl__weight=1.0, mcl__bn="none", mcl__mal_enabled=False, hico__weight=1.0)
    model = PretrainModule(cfg)
    clips = torch.randn(3, 3, 3, 4, 32, 32)
    ids = torch.tensor([7, 8, 7])                             # a batch with a repeated video
    model(clips, None, 0.0, video_id=ids)
    for name, bank in model.banks().items():
        assert bank.filled_ids().tolist() == [7, 8, 7], name
    assert bank.state_dict()["ids"][:3].tolist() == [7, 8, 7]


# --------------------------------------------------------------------------- 2 gloo ranks
B, D, TAU = 3, 6, 0.2
IDS = torch.tensor([1, 2, 1, 2, 3, 4])                        # videos 1 and 2 on both ranks


def _bank(rank):
    keys = _unit(5 + rank, D, 50 + rank)
    return keys, torch.tensor([1, 3, 2, 9, 1, 4])[:5 + rank] if rank else torch.tensor([2, 2, 4, -1, 1])


def _worker(rank, world):
    z_all = _z(B * world, D, 7)
    z = z_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    bank = MemoryBank(16, D, dtype=torch.float64)
    keys, key_ids = _bank(rank)
    bank.enqueue(keys, ids=key_ids)
    loss = visual_consistency(z, TAU, bank, video_id=IDS[rank * B:(rank + 1) * B]).mean()
    loss.backward()
    return loss.detach(), z.grad.clone()


@pytest.mark.slow
@pytest.mark.dist
def test_two_gloo_ranks_ntxent_with_ids_match_one_process():
    res = run_gloo(_worker, 2)
    z = _z(B * 2, D, 7).requires_grad_(True)
    parts = [_bank(r) for r in range(2)]
    keys, key_ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    whole = MemoryBank(16, D, dtype=torch.float64)
    whole.enqueue(keys, ids=key_ids)
    loss = visual_consistency(z, TAU, whole, video_id=IDS).mean()
    loss.backward()
    dist_loss = sum(r[0] for r in res) / 2
    dist_grad = torch.cat([r[1] for r in res]) / 2
    np.testing.assert_allclose(dist_loss.item(), loss.item(), rtol=1e-10)
    np.testing.assert_allclose(dist_grad.numpy(), z.grad.numpy(), rtol=1e-10, atol=1e-14)
    ref = _np_ntxent_ids(z.detach().numpy(), IDS.tolist(), keys.numpy(), key_ids.tolist(), TAU).mean()
    np.testing.assert_allclose(dist_loss.item(), ref, rtol=1e-10)
