"""Serial or split: the one place that decides whether a kernel call runs on the shared pool.

A split kernel (``name_split(parts, *args)``) runs its serial twin on each of ``parts``
parts of the rows (or elements), each on a thread of the shared pool (``pool.py``):
the same code per element, so the same bits as the serial call.
"""

from __future__ import annotations

from .. import pool

# A kernel call splits across the shared pool's threads when its largest operand has at
# least this many elements (below it, starting the threads costs more than it saves).
SPLIT_MIN_ELEMENTS = 16384


def parts_for(elements):
    """How many parts a call over ``elements`` elements runs in: the pool's threads, or 1."""
    parts = pool.threads()
    return parts if parts > 1 and elements >= SPLIT_MIN_ELEMENTS else 1


def run(elements, serial, split, *args, serial_tail=(), split_tail=()):
    """``split(parts, *args, *split_tail)`` on the pool when a call of ``elements`` elements
    splits (``parts_for``), else ``serial(*args, *serial_tail)``; returns what it returns."""
    parts = parts_for(elements)
    if parts > 1:
        return split(parts, *args, *split_tail)
    return serial(*args, *serial_tail)
