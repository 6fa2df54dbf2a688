"""One run owns a checkpoint directory at a time; output paths are checked before work.

``RunLock(directory).acquire()`` takes an exclusive ``flock`` on
``<directory>/.dtrain.lock`` and writes who holds it (host, pid, start time,
command line) into the file. The kernel drops the lock when its process
ends, however it ends, so a lock is never left held by a dead run; a file
that still names a run which is gone (killed before it could clear the file)
is simply taken over, and acquire() says so. A second run on the same
directory, while the first is alive, gets a LockError naming the holder.

flock works across processes on one machine and, on Linux NFS clients, across
machines (it is mapped onto NFS byte-range locks); on file systems without
lock support acquire() fails with a LockError that says so.

Call it on one rank (rank 0); the lock lives as long as the process, or
until release().
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

__all__ = ["LOCK_NAME", "LockError", "OutputPathError", "RunLock", "check_writable_dir"]

LOCK_NAME = ".dtrain.lock"


class LockError(RuntimeError):
    """Another live run holds the checkpoint directory (one line, no traceback)."""

    user_error = True


class OutputPathError(ValueError):
    """An output path cannot be created or written (one line naming the flag)."""

    user_error = True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"since {info.get('start_time', '?')}")


class RunLock:
    """An exclusive, process-lifetime lock on a checkpoint directory."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self.message: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _read_holder(self, fd: int) -> dict | None:
        try:
            text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        except OSError:
            return None
        if not text:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            return {"unreadable": text[:80]}
        return info if isinstance(info, dict) else {"unreadable": text[:80]}

    def acquire(self) -> str | None:
        """Take the lock or raise LockError; returns a line to print when a lock
        left by a run that is gone was taken over, else None."""
        if self._fd is not None:
            return None
        check_writable_dir(self.directory, "--checkpoint-dir")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LockError(
                f"checkpoint directory {self.directory}: cannot open {LOCK_NAME} ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise LockError(
                    f"checkpoint directory {self.directory}: cannot lock {LOCK_NAME} "
                    f"({exc.strerror}; does this file system support locks?)"
                ) from None
            holder = self._read_holder(fd)
            for _ in range(10):  # the holder writes its name right after locking
                if holder:
                    break
                time.sleep(0.05)
                holder = self._read_holder(fd)
            os.close(fd)
            raise LockError(
                f"checkpoint directory {self.directory} is in use by {_describe(holder)}; "
                "stop that run or use another --checkpoint-dir"
            ) from None

        previous = self._read_holder(fd)
        self.message = None
        if previous:
            host, pid = previous.get("host"), previous.get("pid")
            if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
                state = "which is no longer running"
            else:
                state = "which ended without releasing it"
            self.message = (
                f"took over stale lock in {self.directory}: left by {_describe(previous)}, {state}"
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": list(sys.argv),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise LockError(
                f"checkpoint directory {self.directory}: cannot write {LOCK_NAME} ({exc.strerror})"
            ) from None
        self._fd = fd
        atexit.register(self.release)
        return self.message

    def release(self) -> None:
        """Clear the holder's name and drop the lock (the file itself stays)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        atexit.unregister(self.release)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def check_writable_dir(path, flag: str) -> Path:
    """Create ``path`` (and its parents) and write and delete a probe file in it.

    Raises OutputPathError, one line naming ``flag`` and the path, e.g.
    ``--checkpoint-dir /etc/hostname/x: cannot create directory (Not a directory)``.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(f"{flag} {path}: exists and is not a directory") from None
    except OSError as exc:
        raise OutputPathError(
            f"{flag} {path}: cannot create directory ({exc.strerror or exc})"
        ) from None
    probe = path / f".dtrain-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write there "
                              f"({exc.strerror or exc})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path
