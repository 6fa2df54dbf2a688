"""The CPU kernel set's Gemm: NumPy's matmul, and OpenBLAS's sgemm by address where it serves.

``accumulate`` (out += a @ b) and ``transposed`` (out = a @ b.T) call OpenBLAS's sgemm
through its address (``blas.py``) for float32: beta = 1, which NumPy's matmul cannot
ask for, and for ``a @ b.T`` the call numpy.matmul makes for those layouts, also for
one row or column (where matmul calls gemv), so that the compiled LSTM loops
(``loops.py``, the same sgemm by address) and the Python loop make the same calls.
Any other dtype or layout goes to NumPy.
"""

from __future__ import annotations

import numpy as np

from ..gemm import Gemm
from . import blas, loops


class CpuGemm(Gemm):
    """The CPU step's GEMMs for arrays of ``dtype``."""

    def __init__(self, dtype):
        ffi = blas.ffi()
        self._address = ffi.gemm_addresses.get(np.dtype(dtype))
        # the compiled loops may run: their sgemm is this Gemm's own arithmetic
        self.compiled_sgemm = self.accumulates = self._address is not None

    def _matmul(self, a, b, out):
        return np.matmul(a, b, out=out)

    def _accumulate(self, a, b, out):
        address = self._address
        if (
            address is None
            or out.dtype != np.float32
            or not (a.dtype == b.dtype == out.dtype)
            or a.shape[1] != b.shape[0]
            or out.shape != (a.shape[0], b.shape[1])
            or not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous)
        ):
            out += a @ b
        elif out.size:
            blas.ffi().gemm_acc(address, a, b, out)
        return out

    def _transposed(self, a, b, out):
        address = self._address
        if (
            address is None
            or out.dtype != np.float32
            or not (a.dtype == b.dtype == out.dtype)
            or a.shape[1] != b.shape[1]
            or out.shape != (a.shape[0], b.shape[0])
            or 0 in out.shape
            or not (a.strides[1] == b.strides[1] == out.strides[1] == out.itemsize)
        ):
            return np.matmul(a, b.T, out=out)
        blas.ffi().gemm_bt(address, a, b, out)
        return out

    def tell_recorder(self, log, dtype, seconds_of):
        """Each GEMM of a compiled loop's ``log`` (``loops.py``), in call order, to the
        recorder; ``seconds_of(ticks)`` converts the time-stamp ticks."""
        if self.recorder is None:
            return
        kinds = {loops.ACCUMULATE: "accumulate", loops.TRANSPOSED: "transposed"}
        for row in log.tolist():
            a, b, out = (
                (row[c], (row[c + 1], row[c + 2]), (row[c + 3], row[c + 4]), dtype.str)
                for c in (2, 7, 12)
            )
            self.recorder(kinds[row[0]], a, b, out, seconds_of(row[1]))
