"""Orphan exit: a rank whose launcher died stops, instead of running on unseen.

When the launcher (the rank's parent process, e.g. hydra_pmi_proxy) dies, the
rank exits: a parent-death signal (prctl(PR_SET_PDEATHSIG) through ctypes, on
Linux) plus a thread that compares ``os.getppid()`` with the parent it started
with, every second. A training rank stops as for SIGHUP (checkpoint, then exit)
within ``ORPHAN_GRACE`` seconds; any other process exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from .. import signals
from ..errors import write_stderr

__all__ = ["ORPHAN_EXIT_CODE", "ORPHAN_SIGNAL", "arm_orphan_exit", "check_parent"]

ORPHAN_EXIT_CODE = 129  # 128 + SIGHUP: the launcher hung up
ORPHAN_GRACE = 20.0  # s: an orphaned training rank checkpoints and exits within this, or is ended
ORPHAN_SIGNAL = signal.SIGUSR2  # the parent-death signal
_PR_SET_PDEATHSIG = 1

_ORPHAN = {"armed": False, "ppid": None, "who": "", "gone": False}
_LAUNCHER_ENV = ("PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


def _orphan_exit() -> None:
    """The launcher is gone (a closed terminal's SIGHUP to its process group, a pipe's SIGPIPE,
    a kill). A training rank stops as for SIGHUP: the ranks agree at the next step, checkpoint
    and exit, within ``ORPHAN_GRACE`` s or are ended then; any other process exits now."""
    if _ORPHAN["gone"]:
        return
    _ORPHAN["gone"] = True
    head = f"dtrain: {_ORPHAN['who']}: the launcher (parent process {_ORPHAN['ppid']}) is gone"
    if not signals.installed():
        write_stderr(f"{head}; exiting (status {ORPHAN_EXIT_CODE})")
        os._exit(ORPHAN_EXIT_CODE)
    write_stderr(f"{head}; stopping after this step with a checkpoint, as for SIGHUP")
    timer = threading.Timer(ORPHAN_GRACE, _orphan_deadline)
    timer.daemon = True
    timer.start()
    signals.request_stop("SIGHUP", signal.SIGHUP, why="orphan")


def _orphan_deadline() -> None:
    write_stderr(f"dtrain: {_ORPHAN['who']}: no checkpoint within {ORPHAN_GRACE:.0f} s of the "
         f"launcher's end; exiting (status {ORPHAN_EXIT_CODE})")
    os._exit(ORPHAN_EXIT_CODE)


def check_parent(*_args) -> None:
    if os.getppid() != _ORPHAN["ppid"]:
        _orphan_exit()


def _watch_parent() -> None:
    while not _ORPHAN["gone"]:
        time.sleep(1.0)
        check_parent()


def _set_parent_death_signal(sig) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def arm_orphan_exit(rank: int, size: int) -> bool:
    """Make this rank exit when its launcher dies (once per process; a no-op for a lone process).

    The parent is the launcher's per-node proxy (hydra_pmi_proxy, prted,
    slurmstepd). Its death sends ``ORPHAN_SIGNAL`` (prctl PR_SET_PDEATHSIG);
    the handler, and a thread polling ``os.getppid()`` every second (for a
    main thread blocked in MPI, and where prctl is missing), exit with
    ``ORPHAN_EXIT_CODE`` once the parent is no longer the one we started with.
    A spurious signal (a parent thread ending, a user's kill) changes nothing.
    """
    if _ORPHAN["armed"] or not (size > 1 or any(k in os.environ for k in _LAUNCHER_ENV)):
        return False
    _ORPHAN.update(armed=True, ppid=os.getppid(), who=f"rank {rank}/{size} (pid {os.getpid()})")
    if threading.current_thread() is threading.main_thread():
        signal.signal(ORPHAN_SIGNAL, check_parent)
        _set_parent_death_signal(ORPHAN_SIGNAL)
    threading.Thread(target=_watch_parent, name="dtrain-orphan-exit", daemon=True).start()
    check_parent()  # the parent may have died before the signal was armed
    return True
