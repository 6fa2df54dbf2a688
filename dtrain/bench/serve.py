"""Timing in blocks on request: one contender of a paired comparison, kept alive in its own process.

``bench --framework dtrain|torch --serve`` warms up, says ``ready`` and then
waits on stdin, where the parent (isolated.py) writes ``run K`` (time K steps;
the answer is their times and how much of the machine others used meanwhile)
or ``finish`` (the result of all blocks; on one CPU rank it includes the GEMM
floor). Answers are single lines ``@@{json}`` on stdout. Between requests the
process sleeps in a blocking read, so its thread pools fall idle: the parent
checks that before it times the other contender.

``/proc`` helpers for that check live here too: ``cpu_ns(pid)`` is the CPU
time of every thread of a process, in nanoseconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .load import ForeignLoad


def say(obj):
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(warmup, block, finish):
    """The child's loop: ``warmup()``, then ``run K`` -> ``block(K)`` times, ``finish`` -> ``finish()``."""
    warmup()
    say({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "run":
            load = ForeignLoad().start()
            times = block(int(words[1]))
            say({"times_ms": [1e3 * t for t in times], "foreign_load": load.share()})
        elif words[0] == "finish":
            say({"result": finish()})
            return 0
    return 1  # the parent went away


def cpu_ns(pid):
    """CPU time of all threads of process ``pid`` so far (ns), or None where /proc has no schedstat."""
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
    """Wait until none of ``pids`` used more than ``busy_ns`` of CPU in a ``window``; seconds waited
    (``limit`` at most: a process that never falls idle is reported, not waited for forever)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        before = [cpu_ns(p) for p in pids]
        time.sleep(window)
        after = [cpu_ns(p) for p in pids]
        if all(a is None or b is None or b - a <= busy_ns for a, b in zip(before, after)):
            break
    return time.perf_counter() - t0
