"""benchmarks/motion_eval_checks.py: its feature normalisations and EMA-backbone loading against
independent computations (its precise BN is mohico.eval.features.precise_bn: tests/test_precise_bn.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mohico.errors import MohicoError


def test_normalised_features_use_the_train_statistics_only(benchmark_script):
    m = benchmark_script("motion_eval_checks")
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, [0.5, 2.0, 5.0], size=(40, 3)).astype(np.float32)
    test = rng.normal(-1.0, 1.0, size=(7, 3)).astype(np.float32)
    raw = m.normalised(train, test, "raw")
    assert raw["train"] is train and raw["test"] is test
    mu = train.astype(np.float64).mean(0)
    sd = train.astype(np.float64).std(0)
    c = m.normalised(train, test, "centred")
    np.testing.assert_allclose(c["test"], test - mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c["train"].mean(0), 0.0, atol=1e-5)
    s = m.normalised(train, test, "standardised")
    np.testing.assert_allclose(s["test"], (test - mu) / sd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["train"].std(0), 1.0, rtol=1e-4)


def test_ema_backbone_loads_the_key_encoders_weights(tmp_path, benchmark_script):
    m = benchmark_script("motion_eval_checks")
    online, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    module = {**{f"backbone.{k}": v for k, v in online.state_dict().items()},
              **{f"key_encoder.backbone.{k}": v for k, v in ema.state_dict().items()}}
    torch.save({"module": module}, ckpt / "mp_rank_00_model_states.pt")
    target = nn.Linear(3, 2)
    m.ema_backbone(target, ckpt)
    assert torch.equal(target.weight, ema.weight) and torch.equal(target.bias, ema.bias)

    torch.save({"module": {f"backbone.{k}": v for k, v in online.state_dict().items()}},
               ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(SystemExit, match="no key_encoder.backbone"):
        m.ema_backbone(target, ckpt)
    with pytest.raises(MohicoError, match="no checkpoint at"):
        m.ema_backbone(target, tmp_path / "elsewhere")
