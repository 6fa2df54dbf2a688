"""The error a user can fix: printed as one line, no traceback, exit 2 on every rank.

Any exception whose class sets ``user_error = True`` is treated so by
``parallel.comm.run_guarded`` (DataError, CheckpointError, DeviceError and
this one). ``write_stderr`` is how a thread or signal handler reports without raising.
"""

import os


class UserError(RuntimeError):
    """Bad input or flags."""

    user_error = True


def write_stderr(text: str) -> None:
    """One or more lines to stderr by the file descriptor, never raising: the launcher's pipe
    may be gone, and the callers (a watchdog thread, a signal handler) must go on."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass
