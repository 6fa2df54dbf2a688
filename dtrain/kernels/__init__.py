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


def for_arrays(xp, dtype, precision="fp32"):
    """The fused kernel set for array module ``xp``, or None (plain xp path).

    ``precision="bf16"``: the CPU set with bf16 GEMM operands (``cpu/gemm_bf16.py``); it
    exists only there, so anything else raises ValueError (one line) rather than run fp32."""
    if precision != "fp32":
        return _bf16_kernels(xp, dtype, precision)
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


def _bf16_kernels(xp, dtype, precision):
    if precision != "bf16":
        raise ValueError(f"--precision: expected fp32 or bf16, got {precision!r}")
    if xp is not np or np.dtype(dtype) != np.float32:
        raise ValueError("--precision bf16: expected --device cpu and --dtype float32 (bf16 "
                         "GEMMs are built for the CPU step only)")
    if env.flag("DTRAIN_NO_KERNELS"):
        raise ValueError("--precision bf16: needs the fused CPU kernels, and DTRAIN_NO_KERNELS "
                         "is set")
    from .cpu import CpuKernels
    from .cpu.gemm_bf16 import Bf16Gemm

    gemm = Bf16Gemm()
    kernel_set = CpuKernels(dtype, gemm=gemm)
    # the step's description (the run's header, the bench) names the library and its code path
    kernel_set.name = f"numba + bf16 GEMMs [{gemm.library}]"
    return kernel_set
