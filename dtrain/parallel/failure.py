"""A failure on any rank ends the whole job: ``run_guarded`` and the abort behind it."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback


def _quiet_stderr() -> None:
    """Send this process's stderr (fd 2) to /dev/null, after flushing what is written."""
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except (OSError, ValueError):
        pass


def _exit_later(code: int, seconds: float = 10.0) -> None:
    """``os._exit(code)`` from a daemon thread after ``seconds``: a bound on a hanging abort."""
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _print_err(text: str) -> None:
    try:
        sys.stderr.write(text.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def abort_now(comm, code: int):
    """End the job with exit status ``code`` from this rank of the Communicator ``comm``:
    the abort hooks run first (best effort); a world of one just exits."""
    for hook in comm._abort_hooks:  # e.g. the trace writes what it has
        try:
            hook()
        except Exception:
            pass
    try:
        sys.stdout.flush()
    except Exception:
        pass
    if comm.size == 1:
        sys.exit(code)
    # The launcher relays each rank's output through a pipe; MPI_Abort tears the job
    # down at once, and lines still in flight can be lost. A short pause lets the
    # message that explains the abort reach the user first.
    time.sleep(0.5)
    _quiet_stderr()  # our line said what went wrong; MPICH's "Abort(2) on node 1 ..." would bury it
    _exit_later(code)  # MPI_Abort can hang when the launcher is gone
    try:
        comm.MPI.COMM_WORLD.Abort(code)
    finally:
        # MPI_Abort may return before the launcher kills this rank: never fall
        # through to more output (a traceback after the one-line error)
        os._exit(code)


def run_guarded(comm, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; any failure takes the whole job of the Communicator
    ``comm`` down.

    On an exception (KeyboardInterrupt and non-zero SystemExit included) this
    prints the traceback and ``dtrain: rank R/P failed: ExcType: msg`` to
    stderr, then MPI-aborts, so no other rank is left waiting in a
    collective. Exceptions whose class sets ``user_error = True`` (bad input,
    divergence) print ``dtrain: error: msg (rank R/P)`` alone and exit with 2.
    Returns fn's result.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0 or comm.size == 1:
            raise
        if not isinstance(code, int):
            _print_err(f"dtrain: rank {comm.rank}/{comm.size} failed: {code}")
            code = 1
        else:
            _print_err(f"dtrain: rank {comm.rank}/{comm.size} exited with status {code}")
        comm._abort_now(code)
    except KeyboardInterrupt:
        _print_err(f"dtrain: rank {comm.rank}/{comm.size} failed: interrupted (KeyboardInterrupt)")
        comm._abort_now(130)
    except BaseException as exc:
        if getattr(exc, "user_error", False):
            # bad input or flags: the one line says what to fix; exit status 2 as for usage errors
            _print_err(f"dtrain: error: {exc} (rank {comm.rank}/{comm.size})")
            comm._abort_now(2)
        # the one line first, so it survives even if the traceback is cut short
        summary = f"dtrain: rank {comm.rank}/{comm.size} failed: {type(exc).__name__}: {exc}"
        _print_err(summary)
        _print_err(traceback.format_exc())
        _print_err(summary)
        comm._abort_now(1)
