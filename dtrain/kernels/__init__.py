"""Fused kernels, one dispatcher: ``for_arrays(xp, dtype)`` gives the set for an array module.

``cpu.CpuKernels`` (Numba) for NumPy arrays, ``cuda.GpuKernels`` (CuPy raw
kernels) for CuPy arrays; both offer the same methods with the same
arguments, so the cells, the model and Adam call either through ``kernels=``.
Both are a ``base.KernelSet``: the one call site of the step's GEMMs (``gemm``,
see ``gemm.py``), what the set can do (``capabilities``), and the LSTM's
recurrence run as one plan per shape says (``lstm_recurrence_forward/backward``).
None (the plain xp path) when Numba or CuPy is missing, or when
DTRAIN_NO_KERNELS is set.
"""

from __future__ import annotations

import numpy as np

from .. import env


def set_num_threads(n, ranks_on_node=1):
    """Threads of the CPU kernels (kept equal to the BLAS threads of the rank). With more
    than one, OpenBLAS runs its jobs on the kernels' threads: one pool (``pool.py``)."""
    try:
        import numba

        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    except Exception:
        return
    from . import pool

    try:
        pool.install(int(n), ranks_on_node)
    except Exception as exc:  # a threading layer that will not start, an unreadable BLAS
        pool.uninstall()
        pool.note(f"OpenBLAS's own threads (the shared pool failed: {exc})")


def for_arrays(xp, dtype):
    """The fused kernel set for array module ``xp``, or None (plain xp path)."""
    if env.flag("DTRAIN_NO_KERNELS"):
        return None
    if xp is np:
        try:
            from .cpu import CpuKernels
        except ImportError:
            return None
        return CpuKernels(dtype)
    try:
        from .cuda import GpuKernels
    except ImportError:
        return None
    return GpuKernels(dtype)
