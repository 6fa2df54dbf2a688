"""The error a user can fix: printed as one line, no traceback, exit 2 on every rank.

Any exception whose class sets ``user_error = True`` is treated so by
``parallel.comm.run_guarded`` (DataError, CheckpointError, DeviceError and
this one).
"""


class UserError(RuntimeError):
    """Bad input or flags."""

    user_error = True
