"""Named scratch buffers reused across calls, and the helpers that take one or None.

A training step that asks for the same buffers with the same shapes allocates
nothing after its first call. ``buffer``/``zeros_buffer`` with ``ws`` None allocate.
"""

from __future__ import annotations

import math

import numpy as np

from .. import alloc


class Workspace:
    """Named scratch buffers that are reused across calls (grown on demand).

    The views handed out are remembered by (name, shape, dtype): a training step
    asks for the same ones every time, and a lookup costs a dict access instead of
    building a view.
    """

    MAX_VIEWS = 4096  # forgotten beyond this (batches of many different lengths)

    def __init__(self):
        self._buffers = {}
        self._views = {}
        self._zeroed = {}  # buffer key -> the buffer zeros() filled (a grown one is new)

    def zeros(self, name, shape, dtype, xp=np):
        """A buffer of zeros that its users only read: zeroed when (re)allocated, not on every
        call (a step's zero state, e.g. the LSTM's c0). Its name must not serve anything else."""
        out = self.get(name, shape, dtype, xp)
        key = (name, np.dtype(dtype).str, xp.__name__)
        if self._zeroed.get(key) is not self._buffers[key]:
            self._buffers[key].fill(0)
            self._zeroed[key] = self._buffers[key]
        return out

    def get(self, name, shape, dtype, xp=np, zero=False):
        try:
            out = self._views[(name, shape, dtype, xp)]
        except (KeyError, TypeError):  # new, or an unhashable shape (a list)
            out = self._view(name, shape, dtype, xp)
        if zero:
            out.fill(0)
        return out

    def _view(self, name, shape, dtype, xp):
        request = (name, shape, dtype, xp)
        shape = tuple(int(s) for s in shape)
        size = math.prod(shape)
        dt = np.dtype(dtype)
        key = (name, dt.str, xp.__name__)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = alloc.empty(max(size, 1), dt, xp)
            self._buffers[key] = buf
            self._views.clear()  # views of the old buffer of this name
        out = buf[:size].reshape(shape)
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()
        try:
            self._views[request] = out
        except TypeError:
            pass
        return out



def buffer(ws, name, shape, dtype, xp, zero=False):
    if ws is None:
        return alloc.zeros(shape, dtype, xp) if zero else alloc.empty(shape, dtype, xp)
    return ws.get(name, shape, dtype, xp, zero=zero)


def zeros_buffer(ws, name, shape, dtype, xp):
    """Zeros that the caller only reads: on the host, from ``ws.zeros`` (filled once); on a
    GPU filled on every call (a captured CUDA graph replays the fill)."""
    if ws is None or xp is not np:
        return buffer(ws, name, shape, dtype, xp, zero=True)
    return ws.zeros(name, shape, dtype, xp)
