"""The cores this process may run on (read by the thread count and the shared pool)."""

from __future__ import annotations

import os


def usable_cores() -> tuple[int, bool]:
    """(cores this process may run on, whether the launcher bound it to fewer than the node's)."""
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = total
    return usable, usable < total
