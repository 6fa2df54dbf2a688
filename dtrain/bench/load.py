"""How much of the machine others used while the bench timed (Linux ``/proc/stat``).

On a shared machine a timing is only as good as the quiet it ran in: a second
busy process on a 2-core machine makes a 2-thread OpenBLAS step several times
slower. ``ForeignLoad`` compares the CPU time the whole machine was busy
(including time the hypervisor stole) with the CPU time of the measured
processes themselves, over the same wall time, and reports the difference as
a share of all cores: 0% is a quiet machine, 50% on 2 cores is one other
process running flat out. None where ``/proc/stat`` is missing.
"""

from __future__ import annotations

import os
import resource
import time

from ..cores import usable_cores

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
    process's finished children as ours (a parent that runs the measured
    processes), else this process's own.
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

    def own_seconds(self):
        return self.own

    def share(self, own_extra=0.0):
        """Others' share of the machine's cores over the timed stretches (``own_extra``: CPU
        seconds of other measured processes, e.g. the other ranks of the run); None if unknown."""
        if self._start is not None:
            self.stop()
        if not self.known or self.wall <= 0:
            return None
        on_node = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
        return max(0.0, (self.busy - self.own - own_extra) / (self.wall * on_node))
