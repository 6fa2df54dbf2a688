"""PendingSum: a nonblocking SUM in flight (``Communicator.iallreduce_sum_``), and the one
progress thread of the process that drives such sums to completion while the caller computes.

The thread is started once, at the first sum, and then sleeps on a condition between sums:
a step that overlaps its reduction starts no thread and allocates no thread state.

Invariants:
- The progress thread calls MPI (``MPI_Test``) only on the requests handed to it, and never
  after ``wait()`` has taken one back: ``wait()`` first stops the polling of its request and
  waits until the thread has let it go, and only then may complete it itself (``MPI_Wait``).
- A second thread may call MPI only under MPI_THREAD_MULTIPLE; without it the communicator
  hands over nothing (``polled=False``) and the sum completes in ``wait()``.
"""

from __future__ import annotations

import threading
import time

POLL_SECONDS = 2e-4  # between MPI_Test rounds of the pending sums: short against a 100 ms step


class _Progress:
    """The process's one thread that polls the pending sums handed to it until each completes
    or its owner takes it back."""

    def __init__(self):
        self._cv = threading.Condition()
        self._jobs = []
        self._thread = None

    def drive(self, pending) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dtrain-iallreduce",
                                                daemon=True)
                self._thread.start()
            self._jobs.append(pending)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                jobs = list(self._jobs)
            finished = []
            for job in jobs:
                if not job._stop.is_set() and job.request.Test():
                    job._done.set()
                if job._stop.is_set() or job._done.is_set():
                    finished.append(job)
            if finished:
                with self._cv:
                    self._jobs = [j for j in self._jobs if j not in finished]
                for job in finished:
                    job._released.set()
            if len(finished) < len(jobs):
                time.sleep(POLL_SECONDS)


_PROGRESS = _Progress()


class PendingSum:
    """A nonblocking SUM in flight (``Communicator.iallreduce_sum_``), driven by the progress
    thread. ``wait()`` returns when it is complete (every rank then holds the sums), and is
    a collective in the stall watchdog's sense: every rank waits."""

    def __init__(self, request, comm=None, nbytes: int = 0, polled: bool = True):
        self.request, self.comm, self.nbytes = request, comm, nbytes
        self.completed_early = False  # done before wait() was called (it overlapped)
        self._done = threading.Event()
        self._stop = threading.Event()
        self._released = threading.Event()  # the progress thread no longer touches request
        if request is None:
            self._done.set()
            self._released.set()
        elif polled:
            _PROGRESS.drive(self)
        else:
            self._released.set()

    def wait(self) -> None:
        if self.request is None:
            return
        comm = self.comm
        self.completed_early = self._done.is_set()
        comm._enter("wait_sum", 0, None, self.nbytes)
        self._stop.set()
        self._released.wait()
        if not self._done.is_set():
            self.request.Wait()
        self.request = None
        comm._leave()
