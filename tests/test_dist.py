"""mohico.dist_env / mohico.dist: environment detection against hand-computed expectations, the
world-of-one behaviour of every collective, and a real 2-rank gloo group (tests/_dist.py)."""
from __future__ import annotations

import pytest
import torch

from _dist import run_gloo
from mohico import dist
from mohico.dist_env import detect_env
from mohico.errors import MohicoError


def test_torchrun_two_nodes_of_three_ranks():
    """torchrun, node 1 of 2 with 3 ranks each: global rank 4 is local rank 1 of node 1."""
    env = detect_env({"RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3",
                      "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
                      "TORCHELASTIC_RUN_ID": "job7"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.num_nodes, env.is_main) == ("torchrun", 4, 6, 1, 3, 1, 2, False)
    assert env.as_environ() == {"RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3",
                                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "GROUP_RANK": "1"}


def test_bare_env_launch_without_local_world_is_one_node():
    """Only the five env:// variables: one node holding the whole world; node rank = rank // world = 0."""
    env = detect_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.launcher, env.local_world_size, env.node_rank, env.num_nodes) == ("torchrun", 4, 0, 1)


def test_srun_uneven_nodes_with_exported_master():
    """srun over 3 nodes holding 2, 2 and 1 tasks (``2(x2),1``): SLURM_PROCID 4 is the only task of
    node 2; the exported MASTER_ADDR/PORT are used as they are (no scontrol needed)."""
    env = detect_env({"SLURM_JOB_ID": "424242", "SLURM_PROCID": "4", "SLURM_NTASKS": "5",
                      "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "n[1-3]",
                      "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
                      "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "31001", "PATH": "/nonexistent"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == ("slurm", 4, 5, 0, 1, 2, "10.1.1.1", 31001)


def test_srun_port_from_job_id():
    """No MASTER_PORT: 20000 + 424242 % 20000 = 20000 + 4242 (array jobs: the id before '_')."""
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "n1", "SLURM_STEP_ID": "0", "MASTER_ADDR": "n1"}
    assert detect_env({**base, "SLURM_JOB_ID": "424242"}).master_port == 24242
    assert detect_env({**base, "SLURM_JOB_ID": "39999_7"}).master_port == 39999


def test_srun_tasks_per_node_disagreeing_with_ntasks_is_refused():
    with pytest.raises(MohicoError, match=r"SLURM_NTASKS mismatch.*adds up to 5"):
        detect_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "6", "SLURM_LOCALID": "0",
                    "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_ID": "0",
                    "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "MASTER_ADDR": "n1"})


def test_world_of_one_without_a_process_group():
    assert not dist.is_initialized()
    assert (dist.rank(), dist.world(), dist.rank_world(), dist.is_distributed()) == (0, 1, (0, 1), False)
    x = torch.arange(6.0).view(3, 2)
    assert dist.all_gather_cat(x) is x
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("mine") == "mine"
    assert dist.any_rank(True) is True and dist.any_rank(False) is False
    t = torch.tensor([3.0])
    assert dist.all_reduce_(t, "max") is t and t.item() == 3.0
    dist.barrier()
    dist.shutdown()                       # nothing to destroy: no error
    with pytest.raises(ValueError, match="op must be one of"):
        dist.all_reduce_(t, "mean")


def _collectives(rank: int, world: int) -> dict:
    x = torch.tensor([[rank, 10 * rank], [rank + 100, 0]], dtype=torch.int64)    # (2, 2) per rank
    summed = dist.all_reduce_(torch.tensor([float(rank + 1)], dtype=torch.float64), "sum")
    biggest = dist.all_reduce_(torch.tensor([float(rank * 7)]), "max")
    dist.barrier()
    return {"rank_world": dist.rank_world(), "distributed": dist.is_distributed(),
            "gathered": dist.all_gather_cat(x),
            "objects": dist.all_gather_object({"rank": rank, "name": f"r{rank}"}),
            "broadcast": dist.broadcast_object(f"from {rank}", src=1),
            "any_none": dist.any_rank(False), "any_rank1": dist.any_rank(rank == 1),
            "any_all": dist.any_rank(True), "sum": summed.item(), "max": biggest.item()}


@pytest.mark.dist
def test_two_rank_gloo_collectives():
    res = run_gloo(_collectives, world=2)
    expected_gather = torch.tensor([[0, 0], [100, 0], [1, 10], [101, 0]], dtype=torch.int64)
    for r, out in enumerate(res):
        assert out["rank_world"] == (r, 2) and out["distributed"]
        assert torch.equal(out["gathered"], expected_gather)
        assert out["objects"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}]
        assert out["broadcast"] == "from 1"
        assert (out["any_none"], out["any_rank1"], out["any_all"]) == (False, True, True)
        assert (out["sum"], out["max"]) == (3.0, 7.0)
