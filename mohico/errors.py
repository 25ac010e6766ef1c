"""Error types and the exit codes: :class:`ExitCode` is the one table of them (the CLI, each
rank, the trainer's watchdog and the SLURM job script ``slurm/pretrain.sbatch`` use it; a test
checks the script's numbers against it)."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code of ``mohico`` and of its ranks, with its one-line meaning (``.meaning``)."""

    OK = 0, "success"
    FAILED = 1, "a runtime failure (MohicoError), or a rank that stopped because a peer did"
    CONFIG = 2, "a bad config file, key or value, or wrong command-line usage (ConfigError, UsageError)"
    PREEMPTED = 3, "checkpointed after a preemption signal (SIGUSR1/SIGTERM); the job script requeues"
    NONFINITE = 4, "stopped after trainer.nonfinite_limit non-finite losses in a row, or non-finite weights"
    STALLED = 5, "no batch or step for trainer.stall_timeout_s, or a loader worker died (the watchdog)"
    SIGNALLED_UNSAVED = 6, ("a preemption signal found the ranks blocked past trainer.signal_grace_s: exited "
                            "without saving (the last checkpoint is intact); the job script requeues")
    INTERRUPTED = 130, "Ctrl-C (SIGINT) at the command line"

    def __new__(cls, code: int, meaning: str):
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member


class MohicoError(Exception):
    """A runtime failure with a message meant for the user (exit code 1)."""

    exit_code = ExitCode.FAILED.value


class ConfigError(MohicoError):
    """A bad config file, key, value or command-line usage (exit code 2)."""

    exit_code = ExitCode.CONFIG.value


class UsageError(ConfigError):
    """Wrong command-line usage (exit code 2)."""


class NotBuiltError(UsageError):
    """A subcommand that exists in the CLI but is not implemented in this release (exit code 2)."""


class PeerFailureError(MohicoError):
    """This rank stops only because a peer rank did (exit code 1): never the root cause of a job's
    failure when another rank reports its own (mohico.launcher.spawn reports the first rank's)."""
