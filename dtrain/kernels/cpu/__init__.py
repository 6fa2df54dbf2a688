"""Fused CPU kernels (Numba) for the hot elementwise work of a training step, by concern.

- ``jit``: compile options, the caching decorator, exp32 and the float32 gates;
- ``cells``: each cell's step forward and backward (LSTM, RNN, GRU);
- ``softmax``: the softmax cross-entropy loss and its gradient, in place over the scores;
- ``adam``: Adam over the flat parameter buffer;
- ``embedding``: the row-sparse embedding gradient;
- ``rows``: row gathers and scatters, the packed prev_h rows, caption packing;
- ``fixedpoint``: the deterministic reducer's fixed-point sums, the finite check;
- ``blas``: the OpenBLAS FFI (sgemm with beta = 1, a @ b.T, omatcopy) from compiled code;
- ``loops``: the LSTM's recurrent time loops compiled whole;
- ``dispatch``: serial or split across the shared pool's threads;
- ``kernels``: ``CpuKernels``, the kernel set the cells, the model and Adam call.

Numba compiles the kernels on first use and caches them on disk.
"""

from __future__ import annotations

from .jit import EXP_POLY, LN2_HI, LN2_LO, LOG2E, PARTIAL_ROWS
from .kernels import CpuKernels

__all__ = ["CpuKernels", "EXP_POLY", "LN2_HI", "LN2_LO", "LOG2E", "PARTIAL_ROWS"]
