"""Error types and the CLI exit codes they map to (0 success, 1 runtime failure, 2 usage/config)."""


class MohicoError(Exception):
    """A runtime failure with a message meant for the user (exit code 1)."""

    exit_code = 1


class ConfigError(MohicoError):
    """A bad config file, key, value or command-line usage (exit code 2)."""

    exit_code = 2


class UsageError(ConfigError):
    """Wrong command-line usage (exit code 2)."""


class NotBuiltError(UsageError):
    """A subcommand that exists in the CLI but is not implemented in this release (exit code 2)."""


class PeerFailureError(MohicoError):
    """This rank stops only because a peer rank did (exit code 1): never the root cause of a job's
    failure when another rank reports its own (mohico.launcher.spawn reports the first rank's)."""
