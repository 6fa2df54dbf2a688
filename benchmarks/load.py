"""How much of the machine others used while a contender was timed (Linux ``/proc``).

On a shared machine a timing is only as good as the quiet it ran in: a second
busy process on a 2-core machine makes a 2-thread OpenBLAS step several times
slower. ``ForeignLoad`` compares the CPU time the whole machine was busy
(including time the hypervisor stole) with the CPU time of the measured
processes themselves, over the same wall time, and reports the difference as
a share of all cores: 0% is a quiet machine, 50% on 2 cores is one other
process running flat out. None where ``/proc/stat`` is missing.

``cpu_ns(pid)`` and ``wait_idle(pids)`` read the CPU time of other processes:
the harness checks with them that a contender's thread pools are asleep
before it times the other one.
"""

from __future__ import annotations

import os
import resource
import time

from dtrain.cores import usable_cores

NOISY_SHARE = 0.05  # above this, a result is flagged as measured on a busy machine


def _busy_seconds():
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal


def _own_seconds(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def cores():
    return usable_cores()[0]


class ForeignLoad:
    """Other processes' CPU use while this one is timed, as a share of all cores.

    Call ``start()`` and ``stop()`` around each timed stretch (they accumulate);
    ``share()`` covers all of them. ``children=True`` counts the CPU time of this
    process's waited-for children (and theirs) as ours: a parent that runs the
    measured processes to their end; else this process's own.
    """

    def __init__(self, children=False):
        self.who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
        self.wall = self.busy = self.own = 0.0
        self.known = _busy_seconds() is not None
        self._start = None

    def start(self):
        self._start = (time.perf_counter(), _busy_seconds(), _own_seconds(self.who))
        return self

    def stop(self):
        t0, b0, o0 = self._start
        self.wall += time.perf_counter() - t0
        busy = _busy_seconds()
        self.busy += (busy - b0) if busy is not None and b0 is not None else 0.0
        self.own += _own_seconds(self.who) - o0
        self._start = None

    def share(self):
        """Others' share of the machine's cores over the timed stretches; None if unknown."""
        if self._start is not None:
            self.stop()
        if not self.known or self.wall <= 0:
            return None
        on_node = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
        return max(0.0, (self.busy - self.own) / (self.wall * on_node))


def cpu_ns(pid):
    """CPU time of all threads of process ``pid`` so far (ns), or None where /proc has no
    schedstat."""
    total, found = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                found = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total if found else None


def wait_idle(pids, window=0.05, limit=10.0, busy_ns=1_000_000):
    """Wait until none of ``pids`` used more than ``busy_ns`` of CPU in a ``window``; seconds
    waited (``limit`` at most: a process that never falls idle is reported, not waited for
    forever)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        before = [cpu_ns(p) for p in pids]
        time.sleep(window)
        after = [cpu_ns(p) for p in pids]
        if all(a is None or b is None or b - a <= busy_ns for a, b in zip(before, after)):
            break
    return time.perf_counter() - t0
