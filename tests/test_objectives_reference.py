"""Pinned float64 losses, gradients, EMA and bank state of PretrainModule for MCL (+MAL), HiCo
(+bank) and MCL+HiCo on a fixed seed batch, over two optimizer steps with ``momentum_update``
and an evaluation pass.

The reference (``tests/data/objective_reference.json``) was recorded with the code *before*
the key encoder moved out of the objectives into ``PretrainModule`` (one ``KeyEncoder``
shared by MCL and HiCo): the refactor must not change a single loss, gradient or EMA value.
Everything compared is independent of parameter names (the EMA copies were renamed):
grads are summed per online part, EMA parameters and buffers over the whole model.
Regenerate (only on purpose, with the reviewed code): ``python tests/test_objectives_reference.py``.

What is compared holds on any x86-64 machine: each tensor is pinned as ``[sum, norm, l1]``
(``l1`` = sum of |entries|, added 2026-12-06 beside the pre-refactor sums and norms, which are
unchanged). A sum of entries that cancel carries the reduction order's rounding of the terms
summed, so it is compared with a tolerance relative to ``l1``, not to itself (the pinned MCL
step-0 backbone sum, 3.9e-12, was 1.1e-12 on another CPU); every value also has an absolute
floor of ``ABS_FLOOR``, far below any real signal here (the smallest pinned non-zero gradient
norm is 8e-2) and far above float64 rounding. A tensor pinned with a norm below the floor is zero
by definition (its pinned digits are rounding noise: with one thread its L1 is 0.0, with two
3.6e-10) and must stay below the floor. MCL's step-0 gradient is zero by definition (the
bank is empty, so the NCE has only its positive logit): that is asserted on its own. The
comparison still catches a change of a loss by one part in 10^7
(``test_a_changed_loss_fails_the_reference``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mohico.config import Config
from mohico.models.bank import MemoryBank
from mohico.models.pretrain import PretrainModule

REFERENCE = Path(__file__).with_name("data") / "objective_reference.json"
CASES = {"mcl": (1.0, 0.0), "hico": (0.0, 1.0), "mcl_hico": (1.0, 0.5)}
ONLINE_PARTS = ("backbone", "objectives.mcl.proj", "objectives.hico.visual", "objectives.hico.topical",
                "objectives.hico.classifier")


def _cfg(mcl: float, hico: float) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.backbone_options, cfg.model.proj_dim = "r3d_18", {"width": 8}, 16
    cfg.bank.size, cfg.bank.dim = 16, 16
    cfg.objectives.mcl.weight, cfg.objectives.hico.weight = mcl, hico
    cfg.objectives.mcl.momentum, cfg.objectives.hico.momentum = 0.5, 0.25
    cfg.trainer.max_steps, cfg.trainer.steps_per_epoch = 100, 10
    cfg.objectives.mcl.mal.warmup_epochs = 1.0
    return cfg


def _batch(seed: int, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(b, 3, 3, 4, 16, 16, generator=g, dtype=torch.float64)
    motion = torch.rand(b, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    return clips, motion, torch.tensor([5, 7, 5][:b], dtype=torch.int64)


def _stat(t: torch.Tensor) -> list[float]:
    """``[sum, norm, l1]`` of ``t``: the sum's rounding is bounded relative to ``l1``."""
    t = t.detach().double()
    return [t.sum().item(), t.norm().item(), t.abs().sum().item()]


def run_case(name: str) -> dict:
    """Two SGD steps (lr 0.1) with momentum updates, then an eval pass; every number name-free."""
    torch.manual_seed(0)
    model = PretrainModule(_cfg(*CASES[name])).double()
    out: dict = {}
    for step, (seed, progress) in enumerate([(1, 0.05), (2, 0.5)]):
        clips, motion, ids = _batch(seed)
        model.zero_grad(set_to_none=True)
        loss, terms = model(clips, motion, progress, video_id=ids)
        loss.backward()
        out[f"step{step}/terms"] = {k: v.item() for k, v in sorted(terms.items())}
        named = dict(model.named_parameters())
        for part in ONLINE_PARTS:
            grads = [p.grad for n, p in named.items() if n.startswith(part + ".") and p.grad is not None]
            if grads:
                out[f"step{step}/grad/{part}"] = _stat(torch.cat([g.flatten() for g in grads]))
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
        model.momentum_update()
    frozen = [p.flatten() for p in model.parameters() if not p.requires_grad]
    out["ema_params"] = _stat(torch.cat(frozen))
    out["n_ema_params"] = sum(p.numel() for p in frozen)
    out["buffers"] = _stat(torch.cat([b.double().flatten() for b in model.buffers()]))
    out["banks"] = {k: _stat(bank.ordered_keys()) for k, bank in sorted(model.banks().items())}
    model.eval()
    with torch.no_grad():
        loss, terms = model(*_batch(3)[:2], 1.0, video_id=_batch(3)[2])
    out["eval/terms"] = {k: v.item() for k, v in sorted(terms.items())}
    return out


# logged diagnostics added after the reference was pinned (checked against float64 in test_objectives.py)
ADDED_TERMS = {"mcl/pos_sim", "mcl/neg_sim"}


REL = 1e-9           # float64 after a few thousand operations: ~1e-13 relative; a real change: far more
ABS_FLOOR = 1e-10    # values at float64-rounding level (an exactly-zero gradient) compare as equal


def _close(got, want, path=""):
    """``got`` matches ``want`` (nested dicts / ``[sum, norm, l1]`` stats / scalars) within REL of the
    magnitude of the terms behind each value, plus ABS_FLOOR."""
    if isinstance(want, dict):
        extra = ADDED_TERMS & set(got) if path.endswith("terms") else set()
        assert set(got) - extra == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(want) == 3 and len(got) == 3, f"{path}: a stat is [sum, norm, l1]; got {got}, want {want}"
        (s, n, l1), (ws, wn, wl1) = got, want
        if wn < ABS_FLOOR:    # zero by definition, pinned as rounding noise: its digits are the CPU's own
            assert n < ABS_FLOOR, f"{path}: norm {n}, pinned at rounding level ({wn})"
            return
        assert abs(s - ws) <= REL * max(l1, wl1) + ABS_FLOOR, f"{path} sum: {s} != {ws} (l1 {wl1})"
        for name, g, w in (("norm", n, wn), ("l1", l1, wl1)):
            assert g == pytest.approx(w, rel=REL, abs=ABS_FLOOR), f"{path} {name}: {g} != {w}"
    else:
        assert got == pytest.approx(want, rel=REL, abs=ABS_FLOOR), f"{path}: {got} != {want}"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_losses_grads_ema_match_the_pinned_reference(name, reference):
    got = run_case(name)
    _close(got, reference[name], name)
    if name == "mcl":     # an empty bank: the NCE's only logit is the positive, loss and gradient are 0
        assert got["step0/terms"]["mcl/nce"] == 0.0
        for part in ("backbone", "objectives.mcl.proj"):
            assert got[f"step0/grad/{part}"][1] < ABS_FLOOR, part


@pytest.mark.parametrize("name", ["mcl", "hico"])
def test_a_changed_loss_fails_the_reference(name, reference, monkeypatch):
    """The comparison is not blind: a loss scaled by 1 + 1e-7 (one changed line) fails it."""
    from mohico.models.objectives import hico

    if name == "mcl":
        nce = MemoryBank.nce
        monkeypatch.setattr(MemoryBank, "nce", lambda self, *a, **k: nce(self, *a, **k) * (1 + 1e-7))
    else:
        visual = hico.visual_consistency
        monkeypatch.setattr(hico, "visual_consistency", lambda *a, **k: visual(*a, **k) * (1 + 1e-7))
    with pytest.raises(AssertionError):
        _close(run_case(name), reference[name], name)


if __name__ == "__main__":                      # re-record the reference (on purpose only)
    REFERENCE.write_text(json.dumps({name: run_case(name) for name in CASES}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
