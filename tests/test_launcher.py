"""Launcher: environment detection (plain, torchrun, deepspeed, srun), real multi-process runs
through torchrun (mohico.dist.init + all_reduce, signal forwarding, exit code 3), and
`mohico submit --dry-run` rendering."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mohico.errors import MohicoError, UsageError
from mohico.dist_env import detect_env, parse_tasks_per_node, slurm_port
from mohico.launcher.spawn import combine_exit_codes, root_cause, should_spawn, strip_nproc, torchrun_command

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- detect_env
def test_plain_process_is_world_of_one_on_a_free_port():
    env = detect_env({"PATH": "/usr/bin"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == \
        ("plain", 0, 1, 0, 1, 0)
    assert env.master_addr == "127.0.0.1"
    with socket.socket() as s:        # the port is really free
        s.bind(("127.0.0.1", env.master_port))


def test_plain_process_honours_exported_master():
    env = detect_env({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29999"})
    assert (env.launcher, env.master_addr, env.master_port, env.world_size) == ("plain", "10.1.2.3", 29999, 1)


def test_torchrun_environment():
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                      "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
                      "TORCHELASTIC_RUN_ID": "abc"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == ("torchrun", 5, 8, 1, 4, 1, "node0", 29500)
    assert env.as_environ()["RANK"] == "5" and env.num_nodes == 2


def test_deepspeed_launcher_environment():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                      "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"})
    assert (env.launcher, env.rank, env.local_rank, env.local_world_size, env.node_rank) == ("deepspeed", 3, 1, 2, 1)


def test_launcher_variables_win_over_slurm():
    env = detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1234",
                      "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert env.launcher == "torchrun" and env.rank == 1


@pytest.mark.parametrize("environ, names", [
    ({"RANK": "0"}, ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x"}, ["MASTER_PORT"]),
    ({"LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, ["RANK", "WORLD_SIZE"]),
])
def test_half_set_launcher_environment_names_the_missing_variables(environ, names):
    with pytest.raises(MohicoError, match="half-set") as e:
        detect_env(environ)
    for n in names:
        assert n in str(e.value)


@pytest.mark.parametrize("environ, pattern", [
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, r"RANK=2 but WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "x",
      "MASTER_PORT": "1"}, r"LOCAL_RANK=2"),
    ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, r"RANK='one'"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, r"WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000"),
])
def test_inconsistent_launcher_environment(environ, pattern):
    with pytest.raises(MohicoError, match=pattern):
        detect_env(environ)


@pytest.fixture
def fake_scontrol(tmp_path):
    """A `scontrol` on PATH that expands n[7-8] and reports n7's NodeAddr; logs its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.log"
    script = bindir / "scontrol"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {log}
        if [ "$1 $2" = "show hostnames" ]; then
            case "$3" in "n[7-8]") printf 'n7\\nn8\\n' ;; "bare") echo bare ;; *) echo "bad list $3" >&2; exit 1 ;; esac
        elif [ "$1 $2" = "show node" ]; then
            case "$3" in
                n7) echo "NodeName=n7 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.0.0.7 NodeHostName=host7 Version=22.05.8" ;;
                bare) echo "NodeName=bare Arch=x86_64 State=IDLE" ;;
            esac
        fi
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bindir}:/usr/bin:/bin", "log": log}


def slurm_env(fake, **kw):
    env = {"PATH": fake["PATH"], "SLURM_JOB_ID": "123456", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[7-8]",
           "SLURM_STEP_NODELIST": "n[7-8]", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_TASKS_PER_NODE": "2(x2)"}
    env.update({k: v for k, v in kw.items() if v is not None})
    for k in [k for k, v in kw.items() if v is None]:
        env.pop(k, None)
    return env


def test_srun_task_maps_slurm_variables_and_resolves_the_first_node(fake_scontrol):
    env = detect_env(slurm_env(fake_scontrol))
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == \
        ("slurm", 3, 4, 1, 2, 1)
    assert env.master_addr == "10.0.0.7"                      # NodeAddr of n7, not the name
    assert env.master_port == 20000 + 123456 % 20000 == slurm_port("123456")
    calls = fake_scontrol["log"].read_text().splitlines()
    assert calls == ["show hostnames n[7-8]", "show node n7 -o"]


def test_srun_node_without_nodeaddr_uses_its_name(fake_scontrol):
    env = detect_env(slurm_env(fake_scontrol, SLURM_JOB_NODELIST="bare", SLURM_STEP_NODELIST="bare",
                               SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                               SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1"))
    assert env.master_addr == "bare" and env.world_size == 1


def test_srun_exported_master_overrides_scontrol(fake_scontrol):
    env = detect_env(slurm_env(fake_scontrol, MASTER_ADDR="10.9.9.9", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("10.9.9.9", 31000)
    assert not fake_scontrol["log"].exists()


@pytest.mark.parametrize("changes, pattern", [
    ({"SLURM_NTASKS": None, "SLURM_LOCALID": None}, r"half-set SLURM environment.*SLURM_NTASKS, SLURM_LOCALID"),
    ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 but SLURM_NTASKS=4"),
    ({"SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": None}, r"SLURM_NTASKS mismatch.*2\(x2\) adds up to 4"),
    ({"SLURM_STEP_NUM_TASKS": "2"}, r"SLURM_NTASKS mismatch.*SLURM_STEP_NUM_TASKS=2"),
    ({"SLURM_LOCALID": "2"}, r"SLURM_LOCALID=2"),
    ({"SLURM_NODEID": "2"}, r"SLURM_NODEID=2"),
    ({"SLURM_STEP_ID": None}, r"not started by srun"),      # the batch shell of a 4-task job
])
def test_inconsistent_slurm_environment(fake_scontrol, changes, pattern):
    with pytest.raises(MohicoError, match=pattern):
        detect_env(slurm_env(fake_scontrol, **changes))


def test_batch_shell_of_a_one_task_job_is_a_world_of_one(fake_scontrol):
    env = detect_env(slurm_env(fake_scontrol, SLURM_STEP_ID=None, SLURM_NTASKS="1", SLURM_PROCID="0",
                               SLURM_LOCALID="0", SLURM_NODEID="0"))
    assert (env.launcher, env.world_size, env.master_addr) == ("slurm", 1, "10.0.0.7")


def test_missing_scontrol_says_how_to_fix(fake_scontrol):
    with pytest.raises(MohicoError, match="scontrol is not on PATH.*MASTER_ADDR"):
        detect_env(slurm_env(fake_scontrol, PATH="/nonexistent"))


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(MohicoError):
        parse_tasks_per_node("2(y3)")


# --------------------------------------------------------------------------- spawn helpers
def test_strip_nproc_and_torchrun_command():
    assert strip_nproc(["train", "c.yaml", "--nproc", "2", "a=1", "--nproc=4"]) == ["train", "c.yaml", "a=1"]
    cmd = torchrun_command(2, ["train", "c.yaml", "--nproc", "2"], python="py")
    assert cmd == ["py", "-m", "mohico.launcher.agent", "--standalone", "--nproc_per_node=2",
                   "--module", "mohico.launcher.spawn", "train", "c.yaml"]


def test_combine_exit_codes():
    assert combine_exit_codes(0, {}) == 0
    assert combine_exit_codes(1, {0: 3, 1: 3}) == 3        # torchrun says 1, the ranks say "preempted"
    assert combine_exit_codes(1, {0: 3}) == 3              # rank 1 stopped by torchrun after rank 0 exited
    assert combine_exit_codes(1, {0: 3, 1: 2}) == 2        # a real failure wins
    assert combine_exit_codes(1, {}) == 1


def test_combine_exit_codes_reports_the_rank_that_failed_first():
    """Issue 30 item 1: the root cause wins over the peer that followed it and over a later failure."""
    stall = {"code": 5, "time": 10.0, "line": "stalled: no progress"}
    follower = {"code": 1, "time": 11.0, "line": "rank 0: a peer rank stopped", "follows_peer": True}
    assert combine_exit_codes(1, {0: follower, 1: stall}) == 5
    assert root_cause({0: follower, 1: stall}) == (1, stall)
    assert combine_exit_codes(1, {0: {**follower, "time": 9.0}, 1: stall}) == 5    # even if it wrote first
    assert combine_exit_codes(1, {0: {"code": 6, "time": 12.0}, 1: {"code": 4, "time": 11.5}}) == 4
    assert combine_exit_codes(1, {0: {"code": 6, "time": 12.0}, 1: {"code": 3, "time": 11.0}}) == 6
    assert combine_exit_codes(1, {0: follower}) == 1
    assert root_cause({0: {"code": 3}, 1: {"code": 0}}) is None


def test_should_spawn():
    assert not should_spawn(1, {})
    assert should_spawn(2, {})
    assert not should_spawn(2, {"RANK": "0", "WORLD_SIZE": "2"})           # already a torchrun worker
    with pytest.raises(UsageError, match="srun step"):
        should_spawn(2, {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"})
    with pytest.raises(UsageError):
        should_spawn(0, {})


# --------------------------------------------------------------------------- real processes
RANK_SCRIPT = textwrap.dedent("""\
    import json, os, signal, sys, time
    from pathlib import Path
    from mohico.dist import init, shutdown
    import torch, torch.distributed as dist

    out = Path(sys.argv[1])
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    env = init()
    t = torch.tensor([float(env.rank + 1)], dtype=torch.float64)
    dist.all_reduce(t)
    tag = os.environ.get("SLURM_RESTART_COUNT", "0")
    wait = os.environ.get("WAIT_USR1") and tag == "0"
    if wait:   # like the trainer: agree on the flag at a step boundary, then exit 3
        (out / f"ready-{env.rank}").write_text("1")
        flag = torch.zeros(1)
        for _ in range(1200):
            flag.fill_(1.0 if got else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
            time.sleep(0.05)
    rec = dict(env.__dict__, sum=t.item(), backend=dist.get_backend(), usr1=len(got), pid=os.getpid(),
               restart=tag, env_rank=os.environ["RANK"], env_master=os.environ["MASTER_ADDR"])
    (out / f"run{tag}-rank{env.rank}.json").write_text(json.dumps(rec))
    shutdown()
    sys.exit(3 if wait else 0)
    """)


@pytest.fixture
def rank_script(tmp_path):
    p = tmp_path / "rank.py"
    p.write_text(RANK_SCRIPT)
    return p


def _child_env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_JOB_ID"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_plain_process_init_distributed(tmp_path, rank_script):
    """No launcher: a world of one with gloo on CPU; RANK etc. are exported for DeepSpeed."""
    out = subprocess.run([sys.executable, str(rank_script), str(tmp_path)], env=_child_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "run0-rank0.json").read_text())
    assert (rec["launcher"], rec["world_size"], rec["sum"], rec["backend"], rec["env_rank"], rec["env_master"]) == \
        ("plain", 1, 1.0, "gloo", "0", "127.0.0.1")


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_spawn_local_two_ranks_all_reduce_forward_signal_and_exit_3(tmp_path, rank_script, sig):
    """`spawn_local(2, ...)` through torchrun: both ranks mohico.dist.init and all_reduce; a SIGUSR1
    or SIGTERM to the parent reaches both workers (not torchrun, which would die of USR1 and
    kill the workers on TERM); both exit 3 and the parent returns 3 although torchrun exits 1."""
    env = _child_env()
    env["WAIT_USR1"] = "1"
    code = (f"import sys; from mohico.launcher.spawn import spawn_local; "
            f"sys.exit(spawn_local(2, ['--script', {str(rank_script)!r}, {str(tmp_path)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.1)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, output[-3000:]
    recs = [json.loads((tmp_path / f"run0-rank{r}.json").read_text()) for r in (0, 1)]
    for r, rec in enumerate(recs):
        assert (rec["launcher"], rec["rank"], rec["world_size"], rec["local_rank"], rec["local_world_size"]) == \
            ("torchrun", r, 2, r, 2)
        assert rec["sum"] == 3.0 and rec["backend"] == "gloo"
        assert rec["usr1"] >= 1, f"rank {r} never saw {sig.name}"
    assert recs[0]["master_port"] == recs[1]["master_port"]
    assert "exit code 3" in output


# --------------------------------------------------------------------------- submit --dry-run
@pytest.fixture(autouse=True)
def _no_slurm_controller(request, tmp_path_factory, monkeypatch):
    """The rendering tests must not depend on whether a SLURM controller answers on this machine
    (test_slurm's local cluster may be up, with 2-CPU nodes): `sinfo` answers as with none."""
    if not request.node.name.startswith("test_submit"):
        return
    bin_dir = tmp_path_factory.mktemp("no-controller")
    sinfo = bin_dir / "sinfo"
    sinfo.write_text('#!/bin/bash\necho "slurm_load_partitions: Unable to contact slurm controller" >&2\nexit 1\n')
    sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _submit(*args, capsys):
    from mohico.launcher.cli import main

    code = main(["submit", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_submit_dry_run_renders_the_job(tmp_path, capsys, monkeypatch, demo_shards):
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "tiny_cpu.yaml"
    code, out, err = _submit(str(cfg), "run.dir=runs/a b", "optim.lr=0.1", "--nodes", "2", "--gpus-per-node", "4",
                             "--time", "1-02:03:04", "--partition", "gpu", "--account", "proj1", "--cpus-per-task", "8",
                             "--dry-run", capsys=capsys)
    assert code == 0, err
    lines = _sbatch_lines(out)
    run_dir = tmp_path / "runs" / "a b"
    for want in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=1-02:03:04", "--partition=gpu",
                 "--account=proj1", "--requeue", "--signal=USR1@120", "--open-mode=append",
                 f'--output="{run_dir}/slurm-%j.out"', f'--chdir="{tmp_path}"', "--job-name=a_b", "--cpus-per-task=8"]:
        assert want in lines, (want, lines)
    assert not run_dir.exists()                                  # a dry run writes nothing
    # `mohico train` gets the snapshot of the resolved config (overrides applied) under run.dir, quoted
    snap = next(line for line in out.splitlines() if line.startswith("set -- "))[len("set -- "):]
    assert shlex.split(snap)[0].startswith(f"{run_dir}/submitted/") and shlex.split(snap)[0].endswith("/config.yaml")
    assert f"export MOHICO_PYTHON={shlex.quote(sys.executable)}" in out
    assert 'srun --kill-on-bad-exit=0 --wait="${MOHICO_SRUN_WAIT:-300}" ${MOHICO_SRUN_ARGS:-} "$PYTHON" -m mohico train "$@"' in out
    assert "export MOHICO_REQUEUE_BY=sbatch" in out and 'scontrol requeue "${SLURM_JOB_ID}"' in out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


def test_submit_cpu_cluster_and_config_defaults(tmp_path, capsys, monkeypatch, demo_shards):
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "tiny_cpu.yaml"
    code, out, err = _submit(str(cfg), "slurm.nodes=3", "slurm.gpus_per_node=0", "slurm.tasks_per_node=2",
                             "slurm.time=00:30:00", "slurm.signal_seconds=300", "slurm.cpus_per_task=1",
                             "slurm.extra_sbatch=[--mem=4G]", "--dry-run", capsys=capsys)
    assert code == 0, err
    lines = _sbatch_lines(out)
    for want in ["--nodes=3", "--ntasks-per-node=2", "--time=00:30:00", "--signal=USR1@300", "--cpus-per-task=1",
                 "--mem=4G", "--job-name=tiny_cpu"]:
        assert want in lines, (want, lines)
    assert not any(line.startswith(("--gpus-per-node", "--partition", "--account")) for line in lines)
    # flags win over the config
    code, out, _ = _submit(str(cfg), "slurm.nodes=3", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", capsys=capsys)
    assert code == 0 and "--nodes=1" in _sbatch_lines(out) and "--ntasks-per-node=2" in _sbatch_lines(out)


@pytest.mark.slow
def test_rendered_script_is_the_template_plus_header_and_args(tmp_path, capsys, monkeypatch, demo_shards):
    """Only the #SBATCH lines and the marked block change: the template stays the one source."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), "--dry-run", capsys=capsys)
    assert code == 0
    template = (ROOT / "slurm" / "pretrain.sbatch").read_text().splitlines()
    body = [line for line in template if not line.startswith("#SBATCH")]
    rendered = [line for line in out.splitlines() if not line.startswith("#SBATCH")]
    extra = [line for line in rendered if line not in body]
    assert [line.split()[0] for line in extra] == ["set", "export", "export"]
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "pretrain.sbatch")]).returncode == 0


@pytest.mark.parametrize("args, pattern", [
    (["--time", "90"], r"--time '90': expected HH:MM:SS"),
    (["--time", "01:75:00"], r"minutes and seconds must be < 60"),
    (["--time", "00:01:00"], r"not longer than the pre-timeout signal"),
    (["--nodes", "0"], r"--nodes 0: must be >= 1"),
    (["--gpus-per-node", "8", "--tasks-per-node", "2"], r"one task \(rank\) per GPU"),
    (["--gpus-per-node", "0"], r"needs --tasks-per-node"),
    (["--partition", "gpu; rm -rf /"], r"--partition"),
])
def test_submit_rejects_bad_input_with_exit_2(tmp_path, capsys, monkeypatch, args, pattern):
    import re

    monkeypatch.chdir(tmp_path)
    code, out, err = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), *args, "--dry-run", capsys=capsys)
    assert code == 2 and out == ""
    assert re.search(pattern, err), err


def test_submit_bad_config_key_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), "slurm.nodez=2", "--dry-run", capsys=capsys)
    assert code == 2 and "slurm.nodes" in err


def test_submit_without_sbatch_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, err = _submit(str(ROOT / "configs" / "tiny_cpu.yaml"), capsys=capsys)
    assert code == 1 and "sbatch is not on PATH" in err
