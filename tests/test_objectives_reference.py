"""Pinned float64 losses, gradients, EMA and bank state of PretrainModule for MCL (+MAL), HiCo
(+bank) and MCL+HiCo on a fixed seed batch, over two optimizer steps with ``momentum_update``
and an evaluation pass.

The reference (``tests/data/objective_reference.json``) was recorded with the code *before*
the key encoder moved out of the objectives into ``PretrainModule`` (one ``KeyEncoder``
shared by MCL and HiCo): the refactor must not change a single loss, gradient or EMA value.
Everything compared is independent of parameter names (the EMA copies were renamed):
grads are summed per online part, EMA parameters and buffers over the whole model.
Regenerate (only on purpose, with the reviewed code): ``python tests/test_objectives_reference.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mohico.config import Config
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
    t = t.detach().double()
    return [t.sum().item(), t.norm().item()]


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


def _close(got, want, path=""):
    if isinstance(want, dict):
        extra = ADDED_TERMS & set(got) if path.endswith("terms") else set()
        assert set(got) - extra == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), f"{path}: {got} != {want}"


@pytest.mark.parametrize("name", list(CASES))
def test_losses_grads_ema_match_the_pinned_reference(name):
    _close(run_case(name), json.loads(REFERENCE.read_text())[name], name)


if __name__ == "__main__":                      # re-record the reference (on purpose only)
    REFERENCE.write_text(json.dumps({name: run_case(name) for name in CASES}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
