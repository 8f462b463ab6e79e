"""Errors a person can act on.

A `UserError` is bad input (config, data, arguments). The CLI prints its message as one
paragraph without a traceback and exits with code 2. Anything else is a bug: exit code 1.
"""


class UserError(Exception):
    """Bad config, bad data or bad arguments. The message names the file, key or record."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training stopped on purpose (non-finite losses, collapse with action: stop).
    The CLI prints the message without a traceback and exits with code 1."""

    exit_code = 1


class WriteFailed(TrainingStopped):
    """A file could not be written (disk full, permissions). What was written before is intact;
    exit code 1 with the message, no traceback."""


class UnsafeFile(UserError):
    """A file that would run code when read (a pickle payload in a checkpoint): refused, exit 2."""
