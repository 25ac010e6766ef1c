"""Run a function on several CPU ranks, each in a gloo process group on 127.0.0.1.

    results = run_gloo(worker, world=2, args=(x,))   # worker(rank, world, x) -> picklable

Each rank is a fresh ``spawn`` process with one torch thread; return values come back through
``torch.save`` files, in rank order. A rank that raises makes ``run_gloo`` raise with that
rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    from mohico.launcher.process_exit import exit_process

    exit_process(0)       # the result is on disk: skip the interpreter's teardown of torch (~1 s a rank)


def run_gloo(fn, world: int = 2, args: tuple = (), timeout: float = 180.0) -> list:
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mohico-gloo-") as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, out_dir)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r, p in enumerate(procs):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} exited with code {p.exitcode} and no result (timeout {timeout} s?)")
            status, value = torch.load(path, weights_only=False)
            if status != "ok":
                raise AssertionError(f"rank {r} failed:\n{value}")
            results.append(value)
    return results
