"""Stop signals from the first line of ``main``, and output that may go nowhere.

A stop signal (SIGTERM, SIGINT, SIGUSR1 from Slurm, SIGHUP from a closed
terminal) means at any moment of a training run: finish the step in flight,
write a checkpoint, exit ``PREEMPTED_EXIT_CODE`` (75) so that Slurm requeues.
So the handlers must be in place before anything slow happens, and stay in
place across ``MPI_Init``:

* :func:`install` (the first thing ``dtrain train`` does) records the first
  signal here instead of letting it kill the process;
* MPICH's ``MPI_Init`` installs its own SIGUSR1 handler, and UCX one for
  SIGHUP (its debug signal), which would swallow the signal. So ``install``
  also blocks the stop signals, before any thread exists: every thread
  started later (OpenBLAS's, Numba's, MPI's) inherits the mask and never takes
  one. :func:`mpi_init` puts Python's handlers back after MPI has started and
  unblocks them in the main thread only: a signal that came meanwhile is
  delivered then, to us, and every later one reaches the main thread.
  MPICH's and UCX's uses of these signals are given up (dtrain owns them);
* the training loop registers with :func:`on_stop` once it can act on a
  signal; one that came earlier (while data loaded, say) is handed over then;
* a launcher that dies (``parallel/watchdog.py``'s orphan check) calls
  :func:`request_stop` as for SIGHUP.

Standard output and error may be pipes whose reader has gone (``| head -1``,
a closed terminal). :func:`guard_output` makes such writes drop their text
instead of raising ``BrokenPipeError``: training goes on (its progress is in
``metrics.jsonl``) and ends as it would have. Invariant: after a stop signal
reaches a process that runs ``install``, that process never dies of it: it
exits through the training loop's stop path, or 2 on a user error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import signal
import sys
import threading
import time

__all__ = ["STOP_SIGNALS", "guard_output", "install", "mpi_init", "on_stop", "orphaned", "received",
           "request_stop"]

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal, resume with --resume latest
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

_state = {"installed": False, "name": None, "at": None, "callbacks": [], "why": None}
_lock = threading.RLock()  # a signal handler may run while the main thread holds it


def received() -> str | None:
    """The name of the first stop signal this process got ("SIGTERM", ...), or None."""
    return _state["name"]


def installed() -> bool:
    """True in a process whose stop signals are handled here (``dtrain train``)."""
    return _state["installed"]


def _handle(signum, _frame) -> None:
    request_stop(signal.Signals(signum).name, signum)


def request_stop(name: str, signum: int = signal.SIGHUP, why: str | None = None) -> None:
    """Record a stop request (the first one wins) and tell the registered callbacks.

    Runs in the main thread for a signal; the orphan check calls it from its own thread.
    """
    with _lock:
        first = _state["name"] is None
        if first:
            _state.update(name=name, at=time.time(), why=why)
        callbacks = list(_state["callbacks"])
    for fn in callbacks:
        fn(int(signum), None)


def install() -> None:
    """Handlers for every stop signal, blocked until :func:`mpi_init` (a signal meanwhile
    waits, pending), and output guards. Call it before any thread starts (main thread)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    _state["installed"] = True
    guard_output()


@contextlib.contextmanager
def mpi_init():
    """Around the code that starts MPI: no stop signal is lost to MPI's own handlers.

    The stop signals stay blocked while MPI starts (threads it starts inherit the mask, so
    they never take one); Python's handlers are re-installed afterwards, and then the main
    thread unblocks them: a pending signal is delivered to our handler now.
    """
    if not _state["installed"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def on_stop(callback) -> None:
    """``callback(signum, frame)`` on every later stop request; at once if one came already."""
    with _lock:
        _state["callbacks"].append(callback)
        name = _state["name"]
    if name is not None:
        callback(int(getattr(signal.Signals, name, signal.SIGHUP)), None)


def reset_for_tests() -> None:
    _state.update(name=None, at=None, why=None, callbacks=[])


# ---------------------------------------------------------------------- output
_LAUNCHER_ENV = ("PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
_launcher_pipes = {1: [], 2: []}  # fd -> [poll objects on the launcher's pipes of that fd]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _watch_launcher_pipes() -> None:
    """Under mpiexec on this host, a rank's output reaches the user through its launcher (the
    proxy and mpiexec, up to two parents up). When mpiexec's stdout is a pipe whose reader left
    (`mpiexec ... | head -1`), its next write kills it with SIGPIPE, and its proxy then kills the
    ranks. So a rank watches those pipes (a poll on a descriptor of the same pipe reports
    POLLERR once no reader is left) and stops writing there first: mpiexec lives on."""
    if not any(k in os.environ for k in _LAUNCHER_ENV) or not sys.platform.startswith("linux"):
        return
    pid = os.getpid()
    for _ in range(2):
        try:
            pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            return
        if pid <= 1:
            return
        for fd in (1, 2):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                    continue
                handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            poller = select.poll()
            poller.register(handle, select.POLLOUT)
            _launcher_pipes[fd].append((handle, poller))


def _launcher_reader_gone(fd: int) -> bool:
    for _handle, poller in _launcher_pipes.get(fd, ()):
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            for h, _ in _launcher_pipes[fd]:
                os.close(h)
            _launcher_pipes[fd] = []
            return True
    return False


class _PipeSafeFile(io.FileIO):
    """A file descriptor whose writes never fail with EPIPE: once the reader is gone (here, or
    behind the launcher), the descriptor is pointed at /dev/null and writes are dropped."""

    def write(self, data):
        if _launcher_reader_gone(self.fileno()):
            _to_devnull(self.fileno())
            return len(data)
        try:
            return super().write(data)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            _to_devnull(self.fileno())
            return len(data)


_closed_note = {"said": False}


def _to_devnull(fd: int) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        return
    if fd == 1 and not _closed_note["said"]:
        _closed_note["said"] = True
        try:  # stderr may still reach the user (`... | head -1`)
            os.write(2, b"dtrain: warning: standard output was closed (broken pipe); training goes "
                        b"on, its progress is in metrics.jsonl\n")
        except OSError:
            pass


def _guarded_stream(stream, fd: int):
    if isinstance(getattr(stream, "buffer", None), io.BufferedWriter) and isinstance(
            getattr(stream.buffer, "raw", None), _PipeSafeFile):
        return stream  # already guarded
    try:
        stream.flush()
    except OSError:
        _to_devnull(fd)
    raw = _PipeSafeFile(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw),
                            encoding=getattr(stream, "encoding", None) or "utf-8",
                            errors=getattr(stream, "errors", None) or "backslashreplace",
                            line_buffering=bool(getattr(stream, "line_buffering", False)),
                            write_through=bool(getattr(stream, "write_through", False)))


def guard_output() -> None:
    """sys.stdout and sys.stderr drop what they cannot write to a closed pipe (idempotent)."""
    if not any(_launcher_pipes.values()):
        _watch_launcher_pipes()
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            if stream is None or stream.fileno() != fd:
                continue
        except (OSError, ValueError, AttributeError):
            continue
        setattr(sys, name, _guarded_stream(stream, fd))


def orphaned() -> bool:
    """True once the launcher of this process is gone (the stop came from the orphan check)."""
    return _state["why"] == "orphan"


def announce(enabled: bool, text: str) -> None:
    """The one line of a stop (rank 0), on stderr: stdout may be a closed pipe, and a batch
    script reads the step's stderr for it (slurm/train.sbatch: SIGTERM is not requeued)."""
    if enabled:
        print(f"dtrain: {text}", file=sys.stderr, flush=True)
