"""Watchdog.stop after a preemption signal: the grace thread has seen the signal and waits; stop()
must end it without raising (a BrokenPipeError there skipped the trainer's cleanup, so the rank
never exited and the SLURM job was never requeued)."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from mohico.trainer import watchdog as wd


def test_stop_after_a_signal_never_raises_even_when_the_grace_thread_ends_first(monkeypatch):
    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    real_set_wakeup_fd = signal.set_wakeup_fd
    try:
        for _ in range(3):
            dog = wd.Watchdog(stall_s=0, grace_s=30).start()
            signal.raise_signal(signal.SIGUSR1)       # written to the wakeup pipe: the grace thread starts its wait
            time.sleep(0.2)
            grace = [t for t in threading.enumerate() if t.name == "mohico-signal-grace"]
            assert grace, "the grace thread is not running"

            def slow_restore(fd, *a, **k):            # the main thread is descheduled in stop(): the grace
                time.sleep(0.2)                       # thread wakes on _stop first, as on a loaded node
                return real_set_wakeup_fd(fd, *a, **k)
            monkeypatch.setattr(wd.signal, "set_wakeup_fd", slow_restore)
            dog.stop()                                # must not raise BrokenPipeError
            monkeypatch.setattr(wd.signal, "set_wakeup_fd", real_set_wakeup_fd)
            for t in grace:
                t.join(5)
                assert not t.is_alive()
            assert signal.set_wakeup_fd(-1) == -1     # the previous wakeup fd is restored
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.slow
def test_trainer_cleanup_runs_every_step_even_when_one_raises():
    import pytest

    from mohico.trainer.train import run_all

    done = []

    def boom():
        raise BrokenPipeError("pipe")
    with pytest.raises(BrokenPipeError):
        run_all(lambda: done.append(1), boom, None, lambda: done.append(3), lambda: done.append(4))
    assert done == [1, 3, 4]
