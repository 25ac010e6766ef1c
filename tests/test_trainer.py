"""End-to-end trainer tests: `mohico train configs/tiny_cpu.yaml --nproc N` on the synthetic shards,
2 CPU ranks (gloo) through the launcher's torchrun spawn.

One uninterrupted reference run (ZeRO 1, 4 steps, checkpoints every 2) is shared; the other
tests compare against it: a run killed (SIGKILL) at step 3 and again during the save of step 4
must end bitwise identical (weights, key encoder, optimizer partitions, bank shards, loader
state, RNG and per-step losses) and keep its W&B id; ZeRO 0 and 2 give the reference's losses;
the checkpoint resumes at 1 rank and back at 2; SIGUSR1 checkpoints and exits 3.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _console import missing_from_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.dist]

BASE = ["trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=2", "trainer.deterministic=true",
        "trainer.log_every=2", "wandb.image_every=2", "trainer.seed=3"]


def train_cmd(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "mohico", "train", CONFIG, "--nproc", str(nproc), f"run.dir={run_dir}",
            f"data.shards={shards}", *BASE, *overrides]


def kill_stragglers(run_dir: Path) -> int:
    """SIGKILL leftover processes of this run (e.g. data-loader workers orphaned when their rank
    was killed); they are found by the run directory on their command line. Returns how many."""
    needle = f"run.dir={run_dir}".encode()
    killed = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != os.getpid() and needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            pass
    return killed


def run_train(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `mohico train` to the end; output goes to a file (orphans must not hold a pipe open)."""
    full_env = {**os.environ, **(env or {})}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out = run_dir.parent / f"{run_dir.name}.out"
    cmd = train_cmd(run_dir, shards, *overrides, nproc=nproc)
    with open(out, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            kill_stragglers(run_dir)
    text = out.read_text()
    return subprocess.CompletedProcess(cmd, code, stdout="", stderr=text)


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss of rank 0; a resumed run re-logs the steps after its checkpoint (last wins)."""
    out = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def tensors(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")
    elif torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        yield prefix, obj


def assert_same_checkpoint(a: Path, b: Path) -> int:
    """Every .pt file of two checkpoint folders holds bitwise-equal tensors and equal scalars."""
    names = sorted(p.name for p in a.glob("*.pt"))
    assert names == sorted(p.name for p in b.glob("*.pt"))
    count = 0
    for name in names:
        # not training state: the loader's statistics counters, our meta (run dir, W&B id, time)
        def state(path):
            return {k: v for k, v in tensors(torch.load(path, map_location="cpu", weights_only=False))
                    if ".loader.counters." not in k and not k.startswith(".mohico.")}
        x, y = state(a / name), state(b / name)
        assert x.keys() == y.keys(), name
        for k in x:
            if torch.is_tensor(x[k]):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{name}{k} differs"
                count += 1
            elif not k.endswith(("time", "ds_config.checkpoint.load_universal")):
                assert x[k] == y[k], f"{name}{k}: {x[k]!r} != {y[k]!r}"
    return count


@pytest.fixture(scope="module")
def reference(synth_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trainer") / "reference"
    res = run_train(run_dir, synth_shards)
    ok(res)
    (run_dir.parent / "reference.first.out").write_text(res.stderr)   # later tests append to reference.out
    return run_dir


def test_two_ranks_zero1_reference_run(reference, synth_shards):
    ck = reference / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000002", "step_00000004"]
    files = sorted(p.name for p in (ck / "step_00000004").iterdir())
    assert files == ["client_rank_00000.pt", "client_rank_00001.pt", "mohico_meta.json", "mp_rank_00_model_states.pt",
                     "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    meta = json.loads((ck / "step_00000004" / "mohico_meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["zero_stage"] == 1
    from mohico.config import config_hash, load_config
    assert meta["config_hash"] == config_hash(load_config(reference / "config.yaml"))
    curve = losses(reference)
    assert sorted(curve) == [1, 2, 3, 4] and all(v == v and abs(v) < 1e4 for v in curve.values())
    # metrics.jsonl: at every log step (log_every=2) the W&B row: objective terms, bank fill, perf, data counters
    rows = {r["step"]: r for r in map(json.loads, (reference / "logs" / "metrics.jsonl").read_text().splitlines())}
    for s in (2, 4):
        assert {"mcl/loss", "hico/loss", "window/loss", "bank/mcl_fill", "hico/topical_acc", "perf/clips_per_s",
                "perf/data_wait_frac", "data/skipped", "epoch"} <= rows[s].keys(), sorted(rows[s])
        assert 0 < rows[s]["bank/mcl_fill"] <= 1 and rows[s]["perf/clips_per_s"] > 0
        # one fill metric per bank; wait fractions are means over the ranks (a sum would exceed 1)
        assert not {"mcl/bank_fill", "hico/bank_fill"} & rows[s].keys()
        assert 0 <= rows[s]["perf/data_wait_frac"] <= 1 and 0 <= rows[s]["data/data_wait_fraction"] <= 1
    # storage reads per clip and per second, per rank and in total (the first window reads the shards)
    r2 = rows[2]
    assert {"io/bytes_per_clip", "io/read_MB_per_s", "data/bytes_read", "data/rank0_bytes_per_clip",
            "data/rank1_bytes_per_clip", "data/rank0_read_bytes_per_s", "data/rank1_read_bytes_per_s"} <= r2.keys()
    assert r2["data/rank0_bytes_per_clip"] > 0 and r2["data/rank1_bytes_per_clip"] > 0
    # equal clips per rank: the run's bytes per clip is the mean of the ranks'
    assert r2["io/bytes_per_clip"] == pytest.approx((r2["data/rank0_bytes_per_clip"] + r2["data/rank1_bytes_per_clip"]) / 2)
    assert r2["data/bytes_read"] <= sum(p.stat().st_size for p in synth_shards.glob("*.tar")) * 4
    # every step: lr, the global gradient norm, the non-finite step count, seconds since the last step
    assert rows[1].keys() == {"step", "loss", "lr", "optim/grad_norm", "optim/nonfinite_steps"}
    for s in (2, 3, 4):
        assert 0 < rows[s]["optim/grad_norm"] < 1e6 and rows[s]["optim/nonfinite_steps"] == 0
        assert 0 < rows[s]["perf/seconds_since_last_step"] < 300
    # per-rank client state: each rank's own bank shard (half of bank.size) and loader state
    c0 = torch.load(ck / "step_00000004" / "client_rank_00000.pt", weights_only=False)
    c1 = torch.load(ck / "step_00000004" / "client_rank_00001.pt", weights_only=False)
    assert set(c0["banks"]) == {"mcl", "hico"}
    for name, bank in c0["banks"].items():
        assert bank["keys"].shape[0] == 128 and bank["world_size"] == 2 and bank["filled"] > 0
        assert not torch.equal(bank["keys"], c1["banks"][name]["keys"])
        # batch.video_id reached the module: every filled slot carries its video's id (none unknown)
        assert bank["ids"].shape == (128,) and (bank["ids"][:bank["filled"]] >= 0).all()
    assert c0["loader"]["rank"] == 0 and c1["loader"]["rank"] == 1
    # DeepSpeed's zero_to_fp32 consolidates our layout (it reads `latest`)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ck))
    module = torch.load(ck / "step_00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert fp32 and all(torch.equal(v, module[k]) for k, v in fp32.items())
    # W&B offline files, and the image of a sampled batch
    runs = list((reference / "wandb").glob(f"offline-run-*-{meta['wandb_run_id']}"))
    assert len(runs) == 1 and (runs[0] / f"run-{meta['wandb_run_id']}.wandb").stat().st_size > 0
    log = (reference / "logs" / "train_rank0.log").read_text()
    assert "clips/s" in log and "wait=" in log and "mem=" in log
    # the console (issue 28): the resolved config once at the start, then a line per window with the ETA
    # and every metric W&B got in the window (metrics.jsonl holds W&B's rows)
    assert log.count("config (resolved") == 1 and "max_steps: 4" in log and "log_every: 2" in log
    for s, window in ((2, (1, 2)), (4, (3, 4))):
        (line,) = [x for x in log.splitlines() if f"] step {s}/4 eta " in x]
        assert missing_from_line(line, [rows[w] for w in window]) == [], line


def test_exact_resume_after_sigkill_and_interrupted_save(reference, synth_shards, tmp_path):
    run_dir = tmp_path / "killed"
    # 1) rank 1 is SIGKILLed right after step 3 (last checkpoint: step 2)
    res = run_train(run_dir, synth_shards, env={"MOHICO_FAULT": "step:3:1"})
    assert res.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    # 2) resumes from step 2; rank 1 is SIGKILLed while writing the step-4 checkpoint
    res = run_train(run_dir, synth_shards, env={"MOHICO_FAULT": "save:4:1"})
    assert res.returncode != 0
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert (ck / ".tmp-step_00000004").is_dir() and not (ck / "step_00000004").exists()
    # 3) the previous checkpoint still loads; the run finishes
    ok(run_train(run_dir, synth_shards))
    log = (run_dir / "logs" / "train_rank0.log").read_text()
    assert "removing incomplete checkpoint" in log and log.count("resumed from") == 2
    assert not (ck / ".tmp-step_00000004").exists()
    # bitwise: weights + key encoder, ZeRO partitions, banks, loader state, RNG, losses
    n = assert_same_checkpoint(reference / "checkpoints" / "step_00000004", ck / "step_00000004")
    assert n > 100
    assert losses(run_dir) == losses(reference)
    # one W&B run id across the three attempts (an offline folder each), saved in the checkpoint
    run_id = json.loads((ck / "step_00000004" / "mohico_meta.json").read_text())["wandb_run_id"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(r.name.endswith("-" + run_id) for r in runs)
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)


@pytest.mark.parametrize("stage", [0, 2])
def test_other_zero_stages_match_reference(reference, synth_shards, tmp_path, stage):
    run_dir = tmp_path / f"zero{stage}"
    ok(run_train(run_dir, synth_shards, f"trainer.zero_stage={stage}", "trainer.max_steps=2"))
    files = {p.name for p in (run_dir / "checkpoints" / "step_00000002").iterdir()}
    assert ("zero_pp_rank_1_mp_rank_00_optim_states.pt" in files) == (stage > 0)
    ref, got = losses(reference), losses(run_dir)
    # step 1 uses the initial weights, step 2 the first update (same lr in both schedules)
    for s in (1, 2):
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5)


def test_resume_at_other_world_size(reference, synth_shards, tmp_path):
    # 2 ranks -> 1: DeepSpeed universal form (SGD momentum included), bank resharded
    one = tmp_path / "one"
    ok(run_train(one, synth_shards, f"checkpoint.resume={reference}/checkpoints/step_00000002",
                 "checkpoint.every_steps=1", nproc=1))
    log = (one / "logs" / "train_rank0.log").read_text()
    assert "resumed from" in log and "at step 2" in log and "resuming a 2-rank checkpoint on 1 ranks" in log
    # the universal form holds every parameter whole: fp32 = the saved weights, SGD momentum kept
    zero = reference / "checkpoints" / "universal" / "step_00000002" / "zero"
    states = torch.load(reference / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                        weights_only=False)
    trainable = {name for group in states["param_shapes"] for name in group}
    moving = 0
    for name, value in states["module"].items():
        assert torch.equal(torch.load(zero / name / "fp32.pt")["param"], value.float()), name
        has_momentum = (zero / name / "momentum_buffer.pt").exists()
        assert has_momentum == (name in trainable), name
        if has_momentum:
            m = torch.load(zero / name / "momentum_buffer.pt")["param"]
            assert m.shape == value.shape
            moving += bool(m.abs().sum() > 0)
    assert moving > len(trainable) // 2
    c = torch.load(one / "checkpoints" / "step_00000004" / "client_rank_00000.pt", weights_only=False)
    assert all(b["keys"].shape[0] == 256 and b["world_size"] == 1 for b in c["banks"].values())
    assert sorted(losses(one)) == [3, 4]
    # 1 rank -> 2
    two = tmp_path / "two"
    ok(run_train(two, synth_shards, f"checkpoint.resume={one}/checkpoints/step_00000003"))
    c = torch.load(two / "checkpoints" / "step_00000004" / "client_rank_00001.pt", weights_only=False)
    assert all(b["keys"].shape[0] == 128 and b["world_size"] == 2 for b in c["banks"].values())
    assert sorted(losses(two)) == [4]


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics = run_dir / "logs" / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}")
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigusr1_checkpoints_and_exits_3(synth_shards, tmp_path):
    run_dir = tmp_path / "preempt"
    cmd = train_cmd(run_dir, synth_shards, "trainer.max_steps=200", "checkpoint.every_steps=100")
    out = tmp_path / "preempt.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            _wait_for_step(run_dir, 1, proc)
            proc.send_signal(signal.SIGUSR1)        # the launcher forwards it to every rank
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
            kill_stragglers(run_dir)
    err = out.read_text()
    assert proc.returncode == 3, err[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / tag / "mohico_meta.json").read_text())
    assert 1 <= meta["step"] < 100
    assert max(losses(run_dir)) == meta["step"]          # saved at the step all ranks stopped at
    assert sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("client_rank_*")) == \
        ["client_rank_00000.pt", "client_rank_00001.pt"]
    log = (run_dir / "logs" / "train_rank0.log").read_text()
    assert "preemption (SIGUSR1)" in log


def test_export_reads_the_run_directory(reference, tmp_path):
    from mohico.models.backbone_file import load_checkpoint_state
    from mohico.models.export import export_checkpoint

    module = torch.load(reference / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    name, options, state = load_checkpoint_state(reference)              # run dir -> latest
    assert name == "r3d_18" and options == {"width": 8}
    assert state.keys() == {k[len("backbone."):] for k in module if k.startswith("backbone.")}
    assert all(torch.equal(v, module["backbone." + k]) for k, v in state.items())
    _, _, older = load_checkpoint_state(reference / "checkpoints" / "step_00000002")
    assert not all(torch.equal(older[k], state[k]) for k in state)
    from mohico.errors import MohicoError
    with pytest.raises(MohicoError, match="width"):          # width 8 is not torchvision's r3d_18
        export_checkpoint(reference, tmp_path / "backbone.pt", fmt="torchvision")
    res = subprocess.run([sys.executable, "-m", "mohico", "export", str(reference), str(tmp_path / "b.pt"),
                          "--format", "mohico"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = torch.load(tmp_path / "b.pt")
    assert saved["name"] == "r3d_18" and all(torch.equal(v, state[k]) for k, v in saved["state_dict"].items())


def test_a_default_two_rank_tiny_cpu_run_prints_no_warning(reference):
    """Issue 28 item 2: the shipped config warns about nothing of its own (data.shuffle_buffer, MAL's
    map), and DeepSpeed's "untested optimizer" and torch's all_gather_into_tensor FutureWarning are
    filtered at their source (mohico/library_noise.py)."""
    output = (reference.parent / "reference.first.out").read_text()
    noisy = [line for line in output.splitlines() if "warning" in line.lower()]
    assert not noisy, "\n".join(noisy)
    assert "step 4/4" in output                      # the run's own lines still show


def test_export_and_load_encoder_print_no_accelerator_line(reference, tmp_path):
    """Without DS_ACCELERATOR (a user's shell), DeepSpeed's "Setting accelerator to CPU" is filtered."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    res = subprocess.run([sys.executable, "-m", "mohico", "export", str(reference), str(tmp_path / "b.pt"),
                          "--format", "mohico"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    load = ("import mohico, torch\n"
            f"encoder, prep = mohico.load_encoder({str(reference)!r})\n"
            "import deepspeed.accelerator as a; print('accelerator', a.get_accelerator().device_name())\n")
    res2 = subprocess.run([sys.executable, "-c", load], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert res2.returncode == 0, res2.stderr[-2000:]
    assert "accelerator cpu" in res2.stdout              # DeepSpeed did pick its accelerator here
    for out in (res.stdout + res.stderr, res2.stdout + res2.stderr):
        assert "Setting accelerator" not in out and "warning" not in out.lower(), out[-2000:]


def test_checkpoint_of_another_config_is_refused(reference, synth_shards):
    before = (reference / "config.yaml").read_text()
    res = run_train(reference, synth_shards, "optim.lr=0.5", nproc=1)
    assert res.returncode == 2                                          # a config error (README's exit codes)
    assert "different config" in res.stderr and "optim.lr: 0.05 -> 0.5" in res.stderr
    assert "checkpoint.force=true" in res.stderr
    assert (reference / "config.yaml").read_text() == before            # nothing of the run changed
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_resume_trains_longer_from_moved_shards(reference, synth_shards, tmp_path):
    """Extending trainer.max_steps, moving the shards (same manifest) and changing
    data.num_workers resume the run; the lr continues from the old schedule's value."""
    import shutil

    run_dir = tmp_path / "longer"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("wandb"))
    moved = tmp_path / "moved-shards"
    shutil.copytree(synth_shards, moved)
    ok(run_train(run_dir, moved, "trainer.max_steps=6", "data.num_workers=2", nproc=2))
    log = (run_dir / "logs" / "train_rank0.log").read_text()
    assert "resumed from" in log and "trainer.max_steps: 4 -> 6 (lr schedule" in log
    assert "data.num_workers: 1 -> 2" in log and "same shards: manifest checksum" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    rows = [json.loads(r) for r in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows}
    # (a row's lr is the one its step used.) The 4-step schedule's warm-up ends at step index 4 (the
    # peak, optim.lr=0.05); the re-plan descends from there along a half-cosine to min_lr at 6
    assert lr[4] < 0.05 and lr[5] == pytest.approx(0.05) and lr[6] == pytest.approx((0.05 + 1e-6) / 2)
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "mohico_meta.json").read_text())
    assert meta["schedule"]["start_step"] == 4 and meta["progress"] == 1.0


def test_grad_accumulation_clipping_lars_one_rank(synth_shards, tmp_path):
    run_dir = tmp_path / "accum"
    ok(run_train(run_dir, synth_shards, "trainer.max_steps=2", "trainer.grad_accum=2", "optim.grad_clip=1.0",
                 "optim.name=lars", "optim.lr=0.3", "optim.scale_lr_with_batch=true", "data.batch_size=2", nproc=1))
    states = torch.load(run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                        weights_only=False)
    assert states["global_steps"] == 2 and states["global_samples"] == 2 * 2 * 2   # steps x accum x batch
    assert states["ds_config"]["gradient_clipping"] == 1.0
    curve = losses(run_dir)
    assert sorted(curve) == [1, 2] and all(v == v for v in curve.values())
    lr = [json.loads(line)["lr"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lr[0] == pytest.approx(0.3 * 4 / 256 * 0.01)         # warm-up start of the batch-scaled lr


def test_online_knn_is_logged_and_leaves_training_bitwise_unchanged(reference, synth_shards, synth_videos, tmp_path):
    """eval.every_steps: rank 0 logs knn/top1 at steps 2 and 4 (metrics.jsonl and W&B); the
    trajectory and both checkpoints equal the reference run's (no state or RNG touched)."""
    run_dir = tmp_path / "online_knn"
    ok(run_train(run_dir, synth_shards, "eval.every_steps=2", f"eval.val_shards={synth_shards}",
                 f"eval.labels={synth_videos / 'labels.json'}", "eval.k=3", "eval.clips_per_video=2"))
    rows = [json.loads(r) for r in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    knn_rows = {r["step"]: r for r in rows if "knn/top1" in r}
    assert sorted(knn_rows) == [2, 4] and not any("knn/failed" in r for r in rows)
    assert all(0 <= r["knn/top1"] <= r["knn/top5"] <= 1 and r["knn/time_s"] > 0 for r in knn_rows.values())
    assert losses(run_dir) == losses(reference)
    for tag in ("step_00000002", "step_00000004"):
        assert assert_same_checkpoint(reference / "checkpoints" / tag, run_dir / "checkpoints" / tag) > 10
    summary = list((run_dir / "wandb").rglob("*.wandb"))
    assert summary and any(b"knn/top1" in p.read_bytes() for p in summary)
