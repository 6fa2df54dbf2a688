"""The one error a checkpoint raises, and the loaded state that raises it for a missing key."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the file.

    ``path`` and ``reason`` (the message without the "checkpoint <path>: "
    prefix) are set when the error is about one file.
    """

    user_error = True  # comm.run_guarded prints the message alone, no traceback

    def __init__(self, message, *, path=None, reason=None):
        super().__init__(message)
        self.path = path
        self.reason = reason if reason is not None else str(message)


def file_error(path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {reason}", path=Path(path), reason=reason)


class CheckpointState(dict):
    """A loaded checkpoint (or one of its groups): a dict whose missing keys
    raise CheckpointError naming the file and key instead of a bare KeyError."""

    def __init__(self, data, path, prefix=""):
        super().__init__(data)
        self.path = Path(path)
        self.prefix = prefix

    def __missing__(self, key):
        raise file_error(self.path, f"missing key '{self.prefix}{key}'")


def first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__

