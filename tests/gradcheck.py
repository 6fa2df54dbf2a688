"""Centred finite differences in float64, for gradient checks."""

import numpy as np


def numeric_grad(f, x, df=None, h=1e-5):
    """d(sum(f() * df))/dx by centred differences, perturbing x in place."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        old = x[ix]
        x[ix] = old + h
        pos = f()
        x[ix] = old - h
        neg = f()
        x[ix] = old
        if df is None:
            grad[ix] = (pos - neg) / (2 * h)
        else:
            grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def norm_error(num, ana):
    """Largest absolute difference relative to the largest gradient entry."""
    num, ana = np.asarray(num, dtype=np.float64), np.asarray(ana, dtype=np.float64)
    return float(np.max(np.abs(num - ana)) / max(np.max(np.abs(ana)), 1e-12))
