"""`mohico train --nproc N`: run N local ranks of the same command through torchrun.

    code = spawn_local(2, ["train", "configs/tiny_cpu.yaml", "optim.lr=0.1"])

starts ``python -m torch.distributed.run --standalone --nproc_per_node 2`` whose workers run
``python -m mohico.launcher.spawn train configs/tiny_cpu.yaml optim.lr=0.1`` — i.e. the
``mohico`` CLI (``python -m mohico ...``) behind a thin wrapper that records each rank's exit
code. torchrun was picked over the deepspeed launcher because it starts ~4 s faster here;
each worker then maps torchrun's variables with :func:`mohico.dist_env.detect_env`.

Exit code: 0 when every rank succeeded. torchrun itself exits 1 whenever a worker fails, so
each rank writes its code, the time it stopped and one line to a status folder
(:mod:`mohico.rank_status`: the CLI for an error, the watchdog before its ``os._exit``
for a stall (5) or a signal it could not honour (6), the wrapper otherwise) and the parent
returns the root cause: the code of the rank that failed first (any code other than 0 and 3),
a rank that stopped only because a peer did (``PeerFailureError``, 1) coming last; else 3
(``PREEMPTED_EXIT_CODE``: the ranks checkpointed after a preemption signal), else torchrun's
code. The parent's last line names that rank and its line.

Signals: SIGUSR1 and SIGTERM sent to this (parent) process are forwarded to the worker
processes directly (the trainer checkpoints and exits 3). torchrun ignores them — it would
die on SIGUSR1 and kill the workers 30 s after SIGTERM — so a signal that reaches every
process (SLURM's ``scancel --signal``) cannot take the agent down mid-checkpoint. SIGINT
(Ctrl-C) goes to torchrun, which stops the workers. torchrun runs in its own session, so a
terminal's Ctrl-C is delivered once, through this process.

A SIGKILL of this process (``kill -9 -- -PGID``, which never reaches torchrun's session) takes
torchrun and the ranks with it at once: torchrun and each rank ask the kernel for SIGKILL when
their parent dies (``PR_SET_PDEATHSIG``), and a rank whose launcher is already gone when it
starts kills itself. Nothing is checkpointed after such a kill (the last published checkpoint
is what a restart resumes from), and the run.dir lock goes with rank 0.
"""
from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from mohico.errors import ExitCode, MohicoError, UsageError
from mohico import rank_status
from mohico.rank_status import STATUS_DIR_VAR

DEBUG_VAR = "MOHICO_DEBUG"        # mirrors mohico.launcher.agent.DEBUG_VAR (that module imports torch)

PREEMPTED_EXIT_CODE = ExitCode.PREEMPTED.value   # the table's (mohico.errors), as the trainer's
LAUNCHER_PID_VAR = "MOHICO_SPAWN_LAUNCHER_PID"   # this process, for the ranks (and run_lock.py)
FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the children must not spawn again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def inside_launcher(environ=None) -> bool:
    """True when this process is already one rank of a multi-process job."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return True
    return "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1


def should_spawn(nproc: int, environ=None) -> bool:
    """Whether `mohico train --nproc N` must start N local ranks (False inside a launcher).

    Raises :class:`UsageError` for ``--nproc > 1`` inside a multi-task srun step (there each
    SLURM task is one rank: ask SLURM for more tasks instead).
    """
    env = os.environ if environ is None else environ
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return False
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "RANK" not in env:
        raise UsageError(f"--nproc {nproc} inside an srun step with SLURM_NTASKS={env['SLURM_NTASKS']}: "
                         f"each SLURM task is already one rank; drop --nproc and request "
                         f"--ntasks-per-node (one task per GPU) instead")
    return not inside_launcher(env)


def torchrun_command(nproc: int, argv: Sequence[str], python: str = sys.executable) -> list[str]:
    return [python, "-m", "mohico.launcher.agent", "--standalone", f"--nproc_per_node={nproc}",
            "--module", "mohico.launcher.spawn", *strip_nproc(argv)]


PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc Linux: no parent-death signal
        return None


def _make_preexec():
    """What the torchrun child runs between fork and exec: ignore the forwarded signals and ask
    for SIGKILL if this parent dies (PR_SET_PDEATHSIG): a launcher killed with SIGKILL must not
    leave an agent that stops its workers gracefully (they would checkpoint after the kill and
    hold the run.dir lock). libc is loaded here, in the parent, so the child makes no dlopen call
    after the fork."""
    prctl = _prctl()

    def preexec() -> None:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_launcher() -> None:
    """In a rank: SIGKILL when torchrun dies (it dies with the launcher), and at once if the
    launcher is already gone (it died before the request could be made)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    launcher = os.environ.get(LAUNCHER_PID_VAR, "")
    if launcher.isdigit() and not _pid_alive(int(launcher)):
        os.kill(os.getpid(), signal.SIGKILL)


def _worker_pids(agent_pid: int) -> list[int]:
    """Direct children of the torchrun agent (its worker processes), from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == agent_pid:
            pids.append(int(d.name))
    return pids


def read_status(status_dir: Path, nproc: int) -> dict[int, dict]:
    """``{rank: {"code", "time", "line", "follows_peer"}}`` of the ranks that reported."""
    return rank_status.read(status_dir, nproc)


def _records(codes: dict) -> dict[int, dict]:
    return {r: (c if isinstance(c, dict) else {"code": int(c)}) for r, c in codes.items()}


def root_cause(codes: dict) -> Optional[tuple[int, dict]]:
    """``(rank, record)`` of the rank whose failure (a code other than 0 and 3) came first; a rank
    that only followed a peer counts after every other; None if no rank failed."""
    failed = [(r, s) for r, s in _records(codes).items() if s["code"] not in (0, PREEMPTED_EXIT_CODE)]
    if not failed:
        return None
    return min(failed, key=lambda rs: (bool(rs[1].get("follows_peer")), rs[1].get("time", float("inf")), rs[0]))


def combine_exit_codes(agent_code: int, codes: dict) -> int:
    """The job's exit code from torchrun's and the ranks' own codes or records (see module docstring)."""
    if agent_code == 0:
        return 0
    cause = root_cause(codes)
    if cause is not None:
        return cause[1]["code"]
    if any(s["code"] == PREEMPTED_EXIT_CODE for s in _records(codes).values()):
        return PREEMPTED_EXIT_CODE
    return agent_code if agent_code > 0 else 128 - agent_code


def spawn_local(nproc: int, argv: Sequence[str], *, python: str = sys.executable,
                env: Optional[dict] = None, debug: bool = False) -> int:
    """Run ``mohico ARGV`` as ``nproc`` local ranks through torchrun; return the exit code.

    ``argv`` is what follows ``mohico`` on the command line (``["train", CONFIG, ...]``);
    ``--nproc`` is removed from it. Blocks until every rank has exited. A rank's error is
    printed once, here, without torchrun's report (:mod:`mohico.launcher.agent`); with
    ``debug`` (``mohico --debug train``) the ranks print theirs with tracebacks, and torchrun too.
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    child_env = dict(os.environ if env is None else env)
    # torchrun must not turn SIGTERM into "kill the workers after 30 s": the parent forwards it.
    child_env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if debug:
        child_env[DEBUG_VAR] = "1"
    else:
        child_env.pop(DEBUG_VAR, None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        child_env.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="mohico-spawn-") as tmp:
        status_dir = Path(tmp)
        child_env[STATUS_DIR_VAR] = str(status_dir)
        child_env[LAUNCHER_PID_VAR] = str(os.getpid())
        received: list[int] = []
        box: list[subprocess.Popen] = []

        def forward(signum, _frame):
            received.append(signum)
            if not box:
                return
            targets = [box[0].pid] if signum == signal.SIGINT else _worker_pids(box[0].pid)
            for pid in targets:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        # Handlers first, so a signal that arrives while torchrun starts is not fatal here
        # (only the main thread may set them; from another thread nothing is forwarded).
        main_thread = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, forward) for s in (*FORWARDED, signal.SIGINT)} if main_thread else {}
        try:
            agent = subprocess.Popen(torchrun_command(nproc, argv, python), env=child_env,
                                     preexec_fn=_make_preexec(), start_new_session=True)
        except BaseException:
            for s, h in old.items():
                signal.signal(s, h)
            raise
        box.append(agent)
        early = [s for s in received if s != signal.SIGINT]
        for signum in early:        # arrived before the workers existed: they will miss it,
            print(f"[mohico spawn] {signal.Signals(signum).name} arrived while torchrun was starting; "
                  f"not forwarded", file=sys.stderr, flush=True)
        try:
            while True:
                try:
                    code = agent.wait()
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    continue
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if agent.poll() is None:   # an exception in the parent: stop the agent
                agent.send_signal(signal.SIGINT)
                try:
                    agent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()
        codes = read_status(status_dir, nproc)
    result = combine_exit_codes(code, codes)
    if signal.SIGINT in received and result not in (0, PREEMPTED_EXIT_CODE):
        result = 130                      # interrupted (Ctrl-C), like the CLI itself
    if result != 0:
        detail = ", ".join(f"rank {r}: {s['code']}" for r, s in sorted(codes.items())) or "no rank reported"
        cause = root_cause(codes)
        first = ""
        if cause is not None and cause[1]["code"] == result:
            r, s = cause
            first = f": rank {r} stopped first (exit {s['code']})" + (f": {s['line']}" if s.get("line") else "")
            rest = s.get("message", "").strip().splitlines()[1:]   # a message of several lines: the others
            first += "".join(f"\n  {x}" for x in rest)
        print(f"[mohico spawn] {nproc} ranks finished with exit code {result}{first} (torchrun {code}; {detail})",
              file=sys.stderr, flush=True)
    return result


def _worker_main(argv: list[str]) -> int:
    """Entry of each torchrun worker: run the CLI and record the exit code.

    The agent's SIG_IGN for SIGTERM is reset to the default (a plain kill must still stop a
    rank); SIGUSR1 stays ignored until the trainer installs its pre-emption handler, so an
    early "checkpoint soon" signal cannot kill a rank that is still importing."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_launcher()
    code: object = ExitCode.FAILED.value
    try:
        if argv and argv[0] == "--script":    # tests: run a plain script as each rank

            sys.argv = argv[1:]
            try:
                runpy.run_path(argv[1], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code
            except MohicoError as e:          # as the CLI does
                from mohico.launcher.cli import report_status

                report_status(e)
                if os.environ.get(DEBUG_VAR) == "1":
                    raise                     # as `mohico --debug` does: the traceback
                print(e, file=sys.stderr)
                code = e.exit_code
        else:
            from mohico.launcher.cli import main

            sys.argv = ["mohico", *argv]
            code = main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = ExitCode.FAILED.value
        rank_status.report(code)          # unless the CLI or the watchdog reported the cause already
        status_dir = os.environ.get(STATUS_DIR_VAR)
        if status_dir:
            if code == PREEMPTED_EXIT_CODE:
                _wait_for_peers(Path(status_dir), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # This rank's work is done and its code recorded: let the interpreter finish its exit
        # (atexit hooks, W&B service teardown) even if torchrun sends SIGTERM on a peer's exit.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return int(code)


def _wait_for_peers(status_dir: Path, nproc: int, timeout: float = 120.0) -> None:
    """A preempted rank waits for the other ranks to finish before exiting: torchrun stops
    the whole group (SIGTERM) as soon as one worker exits non-zero, which could cut rank 0
    off while it still flushes its logs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(list(status_dir.glob("rank-*"))) >= nproc:
            return
        time.sleep(0.05)


if __name__ == "__main__":
    from mohico.launcher.process_exit import exit_process

    exit_process(_worker_main(sys.argv[1:]))
