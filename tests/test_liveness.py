"""Liveness records (issue 14 item 3): a rank killed from outside leaves no note, and its peer
still names it from its record: its process is gone from this host (checked with real processes:
reaped, a zombie, a reused pid) or its record went stale (another host). The 2-rank SIGKILL
end-to-end test is in test_failure_train.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from mohico.trainer import liveness as lv
from mohico.trainer.peer_failure import note_failure, peer_failure_message, peer_notes
from mohico.trainer.watchdog import Watchdog

HOST = socket.gethostname()
BROKEN = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234")


def write(run_dir, rank, **fields):
    rec = {"rank": rank, "host": HOST, "pid": os.getpid(), "start": lv._proc_start(os.getpid()),
           "time": time.time(), "doing": "waiting for the next batch", "state": lv.RUNNING, **fields}
    path = lv.record_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                       # reaped: no such process any more
    return p.pid


def test_record_holds_host_pid_time_and_what_the_rank_does(tmp_path):
    t0 = time.time()
    lv.AliveRecord(tmp_path, 3).refresh("waiting for the next batch")
    rec = json.loads((tmp_path / "logs" / "alive_rank3.json").read_text())
    assert (rec["rank"], rec["host"], rec["pid"], rec["state"]) == (3, HOST, os.getpid(), lv.RUNNING)
    assert t0 - 1 <= rec["time"] <= time.time() + 1 and rec["doing"] == "waiting for the next batch"
    assert lv.verdict(rec) == ""                     # this very process runs


def test_verdicts_on_real_processes_of_this_host():
    now = time.time()
    assert lv.verdict({"host": HOST, "pid": dead_pid(), "state": lv.RUNNING, "time": now}) == "gone"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 20
        while lv._proc_start(zombie.pid) != "zombie" and time.monotonic() < deadline:
            time.sleep(0.05)               # it exited but is not reaped: os.kill(pid, 0) still succeeds
        os.kill(zombie.pid, 0)
        assert lv.verdict({"host": HOST, "pid": zombie.pid, "state": lv.STARTING, "time": now}) == "gone"
    finally:
        zombie.wait()
    # the pid now belongs to another process (reuse): the recorded start time differs
    assert lv.verdict({"host": HOST, "pid": os.getpid(), "start": "1", "state": lv.RUNNING, "time": now}) == "gone"
    # an old record of a process that still runs is not blamed (its watchdog may be busy)
    assert lv.verdict({"host": HOST, "pid": os.getpid(), "state": lv.RUNNING, "time": now - 999}) == ""
    # a rank that said it is stopping or finished is never blamed
    for state in (lv.STOPPING, lv.FINISHED):
        assert lv.verdict({"host": HOST, "pid": dead_pid(), "state": state, "time": now}) == ""


def test_verdicts_on_another_host_go_by_the_records_age():
    now = time.time()
    other = {"host": "node-elsewhere", "pid": os.getpid(), "state": lv.RUNNING}
    assert lv.verdict({**other, "time": now - lv.STALE_S - 1}, now) == "silent"
    assert lv.verdict({**other, "time": now - lv.STALE_S + 3}, now) == ""
    assert lv.verdict({**other, "state": lv.STARTING, "time": now - 999}, now) == ""   # not refreshed yet
    assert lv.verdict({**other, "state": lv.STOPPING, "time": now - 999}, now) == ""


def test_peer_message_names_the_killed_rank_host_pid_age_and_log(tmp_path):
    pid = dead_pid()
    write(tmp_path, 0)
    write(tmp_path, 1, pid=pid, time=time.time() - 4.0)
    write(tmp_path, 2, state=lv.STOPPING)                           # a survivor on its way out
    write(tmp_path, 7, pid=dead_pid(), time=time.time() - 99)       # an earlier run's rank 7 (not in this world)
    t0 = time.monotonic()
    msg = peer_failure_message(tmp_path, 0, BROKEN, world=3)
    assert time.monotonic() - t0 < 2                                # a gone process is decisive: no waiting
    assert msg.startswith("rank 0: a peer rank was killed from outside")
    assert f"rank 1 (host {HOST}, pid {pid}: its process is gone from {HOST}; last alive 4." in msg
    assert "waiting for the next batch" in msg and str(tmp_path / "logs" / "train_rank1.log") in msg
    assert "rank 2" not in msg and "rank 7" not in msg and "Connection closed by peer" in msg
    assert "rank 1 (host" in peer_notes(tmp_path, 0, world=3)               # the stall watchdog's message names it too


def test_peer_message_names_a_silent_rank_of_another_host(tmp_path):
    write(tmp_path, 1, host="node-b", pid=4242, time=time.time() - lv.STALE_S - 2)
    msg = peer_failure_message(tmp_path, 0, BROKEN, wait_s=1.0, world=2)
    assert "rank 1 (host node-b, pid 4242: silent for 1" in msg and "train_rank1.log" in msg


def test_a_note_still_explains_and_without_any_verdict_the_wait_is_bounded(tmp_path):
    write(tmp_path, 1)                                              # alive and refreshed
    t0 = time.monotonic()
    msg = peer_failure_message(tmp_path, 0, BROKEN, wait_s=1.0, world=2)
    assert 1.0 <= time.monotonic() - t0 < 3
    assert "died without a message" in msg and "went stale within 1 s" in msg
    assert f"not confirmed alive: rank 1 (host {HOST}, pid {os.getpid()}: alive;" in msg   # where to look
    assert "rank(s) 2 left no record" in peer_failure_message(tmp_path, 0, BROKEN, wait_s=0.2, world=3)
    note_failure(tmp_path, 1, "stalled: no progress for 600 s")
    msg = peer_failure_message(tmp_path, 0, BROKEN, wait_s=1.0, world=2)
    assert "a peer rank stopped, so this one stops too (rank 1 stopped: stalled: no progress for 600 s)" in msg


def test_watchdog_refreshes_the_record_off_the_main_thread_and_never_after_stop(tmp_path):
    class Fast(lv.AliveRecord):
        REFRESH_S = 0.0             # every tick (1 s)

    rec = Fast(tmp_path, 0)
    dog = Watchdog(stall_s=0, grace_s=0, liveness=rec).start()      # no stall limit: the thread runs for liveness
    try:
        time.sleep(0.3)
        first = json.loads(rec.path.read_text())
        assert first["doing"] == "waiting for the first batch" and first["state"] == lv.RUNNING
        dog.beat("the forward/backward pass and its collectives", collective=True)
        time.sleep(1.5)
        second = json.loads(rec.path.read_text())
        assert second["doing"] == "waiting for the forward/backward pass and its collectives"
        assert second["time"] > first["time"]
    finally:
        dog.stop()
    rec.refresh("stopping: a peer rank failed", lv.STOPPING)
    time.sleep(1.5)
    assert json.loads(rec.path.read_text())["state"] == lv.STOPPING    # the thread is gone: no overwrite
