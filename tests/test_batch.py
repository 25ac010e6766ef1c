"""ClipBatch: the typed batch the loader yields (fields checked, moved as one)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _batches import make_batch
from mohico.datasets.load.batch import ClipBatch


def test_to_moves_every_tensor_and_keeps_values():
    batch = make_batch(torch.randn(2, 3, 3, 4, 8, 8), video_id=torch.tensor([7, 7]))
    moved = batch.to(torch.device("meta"))
    assert moved is not batch and moved.key is batch.key and batch.clips.device.type == "cpu"
    for f in dataclasses.fields(ClipBatch):
        value = getattr(moved, f.name)
        if torch.is_tensor(value):
            assert value.device.type == "meta" and value.dtype == getattr(batch, f.name).dtype, f.name
            assert value.shape == getattr(batch, f.name).shape, f.name
    same = batch.to("cpu")
    assert all(torch.equal(getattr(same, f.name), getattr(batch, f.name)) for f in dataclasses.fields(ClipBatch)
               if f.name != "key")
    assert batch.size == 2


def test_bad_fields_are_named():
    batch = make_batch(torch.randn(2, 3, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="clips must be"):
        dataclasses.replace(batch, clips=torch.randn(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="video_id must be int64"):
        dataclasses.replace(batch, video_id=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="B = len\\(key\\) = 1"):
        dataclasses.replace(batch, key=["one"])
