"""PendingSum: a nonblocking SUM in flight (``Communicator.iallreduce_sum_``) and the
thread that drives it to completion while the caller computes."""

from __future__ import annotations

import threading
import time

POLL_SECONDS = 2e-4  # between MPI_Test calls of a pending sum: short against a step's 100 ms


class PendingSum:
    """A nonblocking SUM in flight (``Communicator.iallreduce_sum_``), and the thread
    that drives it. ``wait()`` returns when it is complete (every rank then holds the
    sums), and is a collective in the stall watchdog's sense: every rank waits."""

    def __init__(self, request, comm=None, nbytes: int = 0, polled: bool = True):
        self.request, self.comm, self.nbytes = request, comm, nbytes
        self.completed_early = False  # done before wait() was called (it overlapped)
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if request is not None and polled:
            self._thread = threading.Thread(target=self._poll, name="dtrain-iallreduce",
                                            daemon=True)
            self._thread.start()
        elif request is None:
            self._done.set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self.request.Test():
                self._done.set()
                return
            time.sleep(POLL_SECONDS)

    def wait(self) -> None:
        if self.request is None:
            return
        comm = self.comm
        self.completed_early = self._done.is_set()
        comm._enter("wait_sum", 0, None, self.nbytes)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._done.is_set():
            self.request.Wait()
        self.request = None
        comm._leave()
