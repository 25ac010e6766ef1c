"""The state contract (mohico/trainer/states.py): every resumable piece round-trips through
``state_dict`` / ``load_state_dict``, the sharded ones ``reshard`` to another world size, and
the checkpointer saves and loads whatever states it is given (one more entry = one more state).
End-to-end with DeepSpeed: tests/test_trainer.py."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mohico.config import load_config
from mohico.errors import MohicoError
from mohico.models.bank import MemoryBank
from mohico.trainer import checkpoint as ck
from mohico.trainer.checkpoint.resume import find_resume
from mohico.trainer.rng import RngState, rank_seed
from mohico.trainer.states import BanksState, EngineState, TrainState
from tests._states import Held


def cfg(*overrides):
    return load_config(None, ["objectives.mcl.weight=1", "model.backbone=r3d_18", "checkpoint.resume=auto",
                              *overrides])


class FakeEngine:
    """Writes and reads one module file as DeepSpeed does at ZeRO 0 (``load_checkpoint`` -> path)."""

    def __init__(self, w=0.0):
        self.w = torch.full((3,), float(w))

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.w}, **client_state}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_module_only, load_lr_scheduler_states):
        self.w = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]["w"]
        return load_dir, {}


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


# --------------------------------------------------------------------------- RNG
def test_rng_state_round_trip_and_reshard_to_step_seeded_streams():
    rng = RngState(seed=3, rank=1)
    torch.manual_seed(11)
    saved = copy.deepcopy(rng.state_dict())
    a = draws()
    draws()
    rng.load_state_dict(saved)
    b = draws()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    rng.reshard([saved, saved], step=6)        # another world size: streams of (seed, rank, step)
    got = draws()
    seed = (3 * 1_000_003 + 1 * 7919 + 6 * 104_729) % 2 ** 63
    want = (random.Random(seed).random(), float(np.random.RandomState(seed % 2 ** 32).rand()),
            torch.rand(3, generator=torch.Generator().manual_seed(seed)))
    assert rank_seed(3, 1, 6) == seed
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


# --------------------------------------------------------------------------- banks
class WithBanks:
    def __init__(self, **banks):
        self._banks = banks

    def banks(self):
        return self._banks


def bank_at(rank: int, world: int, size: int = 16, dim: int = 4) -> MemoryBank:
    bank = MemoryBank(size, dim)
    bank.rank, bank.world_size, bank.shard_size = rank, world, size // world
    bank.keys = torch.zeros(size // world, dim)
    bank.ids = torch.full((size // world,), -1, dtype=torch.int64)
    return bank


def test_banks_reshard_two_ranks_to_one_and_back_against_a_reference():
    torch.manual_seed(0)
    old = [BanksState(WithBanks(mcl=bank_at(r, 2))) for r in range(2)]
    history = []                                   # per rank: (key, id) oldest -> newest, as enqueued
    for r, state in enumerate(old):
        keys = torch.nn.functional.normalize(torch.randn(11, 4), dim=1)
        ids = torch.arange(11) + 100 * r
        bank = state.module.banks()["mcl"]
        bank.enqueue(keys, ids)                    # 11 keys into 8 slots: wraps, the oldest is at slot 3
        assert bank.ptr == 3 and bank.ids[3:].tolist() + bank.ids[:3].tolist() == ids[3:].tolist()
        history.append([(tuple(k.tolist()), int(i)) for k, i in zip(torch.cat([bank.keys[3:], bank.keys[:3]]),
                                                                    ids[3:])])
    saved = [copy.deepcopy(s.state_dict()) for s in old]
    # reference: newest first, ranks interleaved (r0's newest, r1's newest, r0's 2nd newest, ...)
    merged = [history[r][-1 - a] for a in range(8) for r in range(2)]
    one = BanksState(WithBanks(mcl=bank_at(0, 1)))
    one.reshard(saved, step=5)
    bank = one.module.banks()["mcl"]
    assert bank.filled == 16 and bank.world_size == 1
    got = [(tuple(k.tolist()), int(i)) for k, i in zip(bank.ordered_keys(), bank.ids[bank.ptr:].tolist()
                                                         + bank.ids[:bank.ptr].tolist())]
    assert got == merged[::-1]                     # stored oldest -> newest
    back = [BanksState(WithBanks(mcl=bank_at(r, 2))) for r in range(2)]
    for state in back:
        state.reshard([copy.deepcopy(one.state_dict())], step=5)
    for r, state in enumerate(back):               # 2 -> 1 -> 2: each rank's keys back, oldest -> newest
        b = state.module.banks()["mcl"]
        assert [(tuple(k.tolist()), int(i)) for k, i in zip(b.keys, b.ids)] == history[r]
        assert b.ptr == 0 and b.filled == 8
    with pytest.raises(MohicoError, match="other objectives"):
        BanksState(WithBanks(hico=bank_at(0, 1))).reshard(saved, step=5)
    with pytest.raises(MohicoError, match="other objectives"):
        BanksState(WithBanks()).load_state_dict(saved[0])


# --------------------------------------------------------------------------- train state
def test_train_state_round_trip_and_another_runs_wandb_id():
    c = cfg("trainer.max_steps=10")
    a = TrainState(c, world_size=2)
    a.step = 4
    saved = json.loads(json.dumps(a.state_dict()))           # what mohico_meta.json holds
    assert saved["step"] == 4 and saved["world_size"] == 2 and saved["progress"] == pytest.approx(0.4)
    b = TrainState(c, world_size=2)
    b.load_state_dict(saved)
    assert (b.step, b.wandb_run_id, b.plan.state_dict()) == (4, a.wandb_run_id, a.plan.state_dict())
    other = TrainState(c, world_size=2)
    mine = other.wandb_run_id
    other.load_state_dict({**saved, "wandb_run_id": None})   # another run's checkpoint (find_resume drops its id)
    assert other.step == 4 and other.wandb_run_id == mine != a.wandb_run_id


# --------------------------------------------------------------------------- the checkpointer
def states(c, world=1, w=0.0, **per_rank):
    return {"engine": EngineState(FakeEngine(w), 0), "train": TrainState(c, world), **per_rank}


def test_checkpointer_saves_and_loads_any_registered_state(tmp_path):
    c = cfg(f"run.dir={tmp_path / 'run'}", "trainer.zero_stage=0")
    cp = ck.Checkpointer(tmp_path / "run", rank=0, world_size=1, keep=2)
    first = states(c, w=7.0, loader=Held({"n": 3}), extra=Held({"anything": torch.arange(4), "k": [1, 2]}))
    first["train"].step = 6
    cp.save(first)
    client = torch.load(cp.dir / "step_00000006" / ck.client_file(0), weights_only=True)
    assert set(client) == {"rank", "loader", "extra"}
    fresh = states(c, loader=Held(), extra=Held())           # the one line that registers a new state
    resume = find_resume(cp, c, fresh["train"].data_fingerprint)
    assert resume.found and not resume.universal
    cp.load(fresh, resume)
    assert fresh["train"].step == 6 and fresh["train"].wandb_run_id == first["train"].wandb_run_id
    assert torch.equal(fresh["engine"].engine.w, torch.full((3,), 7.0))
    assert fresh["loader"].state == {"n": 3}
    assert torch.equal(fresh["extra"].state["anything"], torch.arange(4)) and fresh["extra"].state["k"] == [1, 2]
    # a state the checkpoint does not hold: an error naming the file and the fix
    with pytest.raises(MohicoError, match=r"client_rank_00000.pt holds no 'ema' state.*new run.dir"):
        cp.load(states(c, loader=Held(), extra=Held(), ema=Held()), resume)


def _saved_one_rank_run(tmp_path, step: int):
    """A one-rank run (ZeRO 0, loader state {"n": 3}) checkpointed at ``step``: ``(cfg, checkpointer)``."""
    c = cfg(f"run.dir={tmp_path / 'run'}", "trainer.zero_stage=0")
    cp = ck.Checkpointer(tmp_path / "run", rank=0, world_size=1, keep=2)
    first = states(c, loader=Held({"n": 3}))
    first["train"].step = step
    cp.save(first)
    return c, cp


def test_another_world_size_reshards_each_state(tmp_path):
    c, cp = _saved_one_rank_run(tmp_path, step=4)
    two = ck.Checkpointer(tmp_path / "run", rank=0, world_size=2, keep=2)   # resumed on 2 ranks (rank 0 of 2)
    got = states(c, world=2, loader=Held())
    two.load(got, find_resume(two, c, None))
    assert got["loader"].state is None and got["loader"].resharded == ([{"n": 3}], 4)
    assert got["train"].step == 4

    class NoReshard:              # a per-rank state that cannot be split or merged
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(MohicoError, match="'loader' .* has no reshard"):
        two.load(states(c, world=2, loader=NoReshard()), find_resume(two, c, None))


def test_checkpoint_of_an_older_layout_is_refused_naming_the_file(tmp_path):
    c, cp = _saved_one_rank_run(tmp_path, step=2)
    meta_file = cp.dir / "step_00000002" / ck.META
    meta = json.loads(meta_file.read_text())
    del meta["format"]                             # written before the state layout existed
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(MohicoError, match=r"mohico_meta.json is a checkpoint of layout 1.*new run.dir"):
        find_resume(cp, c, None)


# --------------------------------------------------------------------------- the loader
def loader_cfg(**data):
    from tests.test_pipeline import small_cfg

    return small_cfg(**data)


def test_loader_leaves_the_training_rng_streams_alone(synth_shards):
    """Starting the loader's workers draws nothing from the global streams (the trainer needs
    no save/restore around ``next()``): its workers' seed comes from its own generator."""
    from mohico.datasets.load.pipeline import build_loader

    loader = build_loader(loader_cfg(num_workers=1), str(synth_shards))
    try:
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        next(loader)
        loader.load_state_dict(loader.state_dict())     # a restart starts the workers again
        next(loader)
        assert torch.equal(torch.get_rng_state(), before[0])
        assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
    finally:
        loader.close()


def test_loader_reshard_starts_a_step_seeded_stream(synth_shards):
    """Another world size: the loader restarts from a seed of (seed, step), as a loader built
    with that seed would (the streams of the old ranks do not map to the new ones)."""
    import dataclasses

    from mohico.datasets.load.pipeline import build_loader

    c = loader_cfg()
    old = build_loader(c, str(synth_shards))
    first = next(old)
    saved = old.state_dict()
    resharded = build_loader(c, str(synth_shards), rank=1, world_size=2)
    resharded.reshard([saved], step=6)
    seed = (c.trainer.seed * 1_000_003 + 6) % 2 ** 31
    reference = build_loader(dataclasses.replace(c, trainer=dataclasses.replace(c.trainer, seed=seed)),
                             str(synth_shards), rank=1, world_size=2)
    a, b = next(resharded), next(reference)
    assert a.key == b.key and torch.equal(a.clips, b.clips)
    assert resharded.state_dict()["seed"] == seed and first.key != a.key
    for x in (old, resharded, reference):
        x.close()
