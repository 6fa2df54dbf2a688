"""Fused CUDA kernels (CuPy RawModule): the GPU twin of ``kernels.cpu.CpuKernels``.

Same methods and arguments as the Numba set, so the cells, the model and
Adam call either one through ``kernels=``. The gate arithmetic is the same;
Adam differs: here its scalar arithmetic runs in float64 and rounds once to
the buffer's dtype (the Numba kernel stays in the buffer's dtype), so CPU and
GPU Adam agree to rounding, not bit for bit.

* ``lstm_step_forward`` / ``lstm_step_backward``: the LSTM gates (sigmoid of
  i, f, o and tanh of g from the pre-activations plus the recurrent term),
  the c and h update, and the gate gradients with the carried dc;
* ``rnn_step_forward`` / ``rnn_step_backward``: the tanh step and its gradient;
* ``gru_step_forward`` / ``gru_step_backward``: the GRU gates r, z, n, the h
  update, and the gradients of the input and recurrent pre-activations;
* ``softmax_cross_entropy``: the per-row loss and, in place in the scores,
  its gradient (one block per row); ``softmax_cross_entropy_masked`` is the
  fixed-shape variant that weighs every row by 0/1 and leaves the loss on
  the device;
* ``adam_update``: Adam over the flat buffer, its scalars from the host, or
  ``adam_update_device`` with the step size and bias correction read from a
  device array (so a captured CUDA graph can replay it with new values);
* ``embedding_grad_segments``: the word-embedding gradient summed per word
  in a fixed order (deterministic, no atomics), dense and row-sparse.

Each kernel is one thread per element (per row for the softmax), row
strides passed explicitly, so row slices of the packed buffers work as they
are. Nothing here synchronises the device: every method can be captured.
The source (cuda_source.py) is compiled once per dtype (float or double) by NVRTC
on first use. The capturable cuBLAS products are in cublas.py (CublasMatmul,
importable from here too).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .base import KernelSet
from .cublas import CublasMatmul
from .cuda_source import CUDA_DTYPES, KERNEL_NAMES, NVRTC_OPTIONS, kernel_source

__all__ = ["CublasMatmul", "CudaProgram", "GpuKernels", "cuda_programs", "kernel_source"]


class CudaProgram(NamedTuple):
    """One CUDA C program as the GPU path compiles it, and the kernels it must define."""

    label: str
    source: str
    options: tuple
    kernels: tuple


def cuda_programs() -> list:
    """Every program this module compiles (one per dtype): what the NVRTC test checks."""
    return [CudaProgram(f"kernels.cuda[{np.dtype(dt).name}]", kernel_source(dt), NVRTC_OPTIONS,
                        KERNEL_NAMES) for dt in CUDA_DTYPES]


_MODULES = {}
_THREADS = 256


def _module(dtype):
    import cupy

    dtype = np.dtype(dtype)
    mod = _MODULES.get(dtype)
    if mod is None:
        mod = cupy.RawModule(code=kernel_source(dtype), options=NVRTC_OPTIONS)
        _MODULES[dtype] = mod
    return mod


def _ld(a):
    """Row stride of a 2-D array in elements (its rows must be contiguous)."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise ValueError("GPU kernels: expected a 2-D array with contiguous rows, got "
                         f"{a.shape} {a.strides}")
    return np.int32(a.strides[0] // a.itemsize)


def _grid(count):
    return (max(1, (int(count) + _THREADS - 1) // _THREADS),)


class GpuKernels(KernelSet):
    """CUDA kernels with the call signatures of ``kernels.cpu.CpuKernels``."""

    name = "cuda"

    def __init__(self, dtype):
        import cupy

        self.cp = cupy
        self.dtype = np.dtype(dtype)
        mod = _module(self.dtype)
        self._k = {name: mod.get_function(name) for name in KERNEL_NAMES}
        self._row_loss = cupy.empty(0, dtype=np.float64)
        self._ones = cupy.ones(1, dtype=self.dtype)

    def _check(self, *arrays):
        for a in arrays:
            if a.dtype != self.dtype:
                raise TypeError(f"GPU kernels built for {self.dtype}, got an array of {a.dtype}")

    # ------------------------------------------------------------------ LSTM / RNN
    def lstm_step_forward(self, a, r, prev_c, c, tc, h, bias):
        n, G = a.shape
        H = G // 4
        if n == 0:
            return
        a += bias  # x Wx arrives without its bias (the CPU kernels fold it into their pass)
        self._check(a, r, prev_c, c, tc, h)
        self._k["lstm_fwd"](_grid(n * H), (_THREADS,), (
            a, r, prev_c, c, tc, h, np.int32(n), np.int32(H),
            _ld(a), _ld(r), _ld(prev_c), _ld(c), _ld(tc), _ld(h)))

    def lstm_step_backward(self, d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc):
        n, G = a.shape
        H = G // 4
        if n == 0:
            return
        self._check(d, dh_up, dh_rec, dc_rec, a, prev_c, tc)
        self._k["lstm_bwd"](_grid(n * H), (_THREADS,), (
            d, dh_up, dh_rec, dc_rec, np.int32(n_next), a, prev_c, tc, np.int32(n), np.int32(H),
            _ld(d), _ld(dh_up), _ld(dh_rec), _ld(dc_rec), _ld(a), _ld(prev_c), _ld(tc)))

    def rnn_step_forward(self, a, r):
        n, H = a.shape
        if n == 0:
            return
        self._check(a, r)
        self._k["rnn_fwd"](_grid(n * H), (_THREADS,),
                           (a, r, np.int32(n), np.int32(H), _ld(a), _ld(r)))

    def rnn_step_backward(self, d, dh_up, dh_rec, n_next, h):
        n, H = h.shape
        if n == 0:
            return
        self._check(d, dh_up, dh_rec, h)
        self._k["rnn_bwd"](_grid(n * H), (_THREADS,), (
            d, dh_up, dh_rec, np.int32(n_next), h, np.int32(n), np.int32(H),
            _ld(d), _ld(dh_up), _ld(dh_rec), _ld(h)))

    def gru_step_forward(self, a, r, prev_h, hn, h):
        n, G = a.shape
        H = G // 3
        if n == 0:
            return
        self._check(a, r, prev_h, hn, h)
        self._k["gru_fwd"](_grid(n * H), (_THREADS,), (
            a, r, prev_h, hn, h, np.int32(n), np.int32(H),
            _ld(a), _ld(r), _ld(prev_h), _ld(hn), _ld(h)))

    def gru_step_backward(self, dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h):
        n, G = a.shape
        H = G // 3
        if n == 0:
            return
        self._check(dax, dah, dh_up, dh_rec, carry, a, hn, prev_h)
        self._k["gru_bwd"](_grid(n * H), (_THREADS,), (
            dax, dah, dh_up, dh_rec, carry, np.int32(n_next), a, hn, prev_h,
            np.int32(n), np.int32(H),
            _ld(dax), _ld(dah), _ld(dh_up), _ld(dh_rec), _ld(carry), _ld(a), _ld(hn), _ld(prev_h)))

    # ------------------------------------------------------------------ softmax loss
    def _softmax(self, scores, targets, weights, normalizer, row_loss):
        cp = self.cp
        M, V = scores.shape
        if M == 0:
            return
        self._check(scores)
        targets = cp.ascontiguousarray(targets, dtype=np.int32)
        has_w = weights is not None
        if has_w:
            self._check(weights)
            weights = cp.ascontiguousarray(weights)
        threads = 128 if V <= 2048 else 256
        self._k["softmax_xent"]((M,), (threads,), (
            scores, targets, weights if has_w else self._ones, np.int32(has_w),
            np.float64(1.0 / normalizer), row_loss, np.int32(M), np.int32(V), _ld(scores)))

    def softmax_cross_entropy(self, scores, targets, normalizer, bias=None, bias_grad=None):
        """Loss (float: one device sync) and, in place in ``scores``, its gradient
        (``bias``, when given, added to every row first; ``bias_grad``, when given,
        the gradient's column sums)."""
        M = scores.shape[0]
        if bias is not None:
            scores += bias
        if self._row_loss.size < M:
            self._row_loss = self.cp.empty(M, dtype=np.float64)
        row_loss = self._row_loss[:M]
        self._softmax(scores, targets, None, normalizer, row_loss)
        if bias_grad is not None:
            scores.sum(axis=0, out=bias_grad)
        return float(row_loss.sum()) / normalizer

    def softmax_cross_entropy_masked(self, scores, targets, weights, normalizer, row_loss):
        """Fixed-shape variant: every row weighted by ``weights`` (0/1); the
        per-row losses (unnormalised, float64) stay in ``row_loss`` on the device."""
        self._softmax(scores, targets, weights, normalizer, row_loss)

    # ------------------------------------------------------------------ Adam
    def adam_update(self, p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        self._check(p, g, m, v)
        n = p.size
        self._k["adam"](self._adam_grid(n), (_THREADS,), (
            p, g, m, v, np.float64(lr / bias1), np.float64(1.0 / bias2), np.float64(b1),
            np.float64(b2), np.float64(eps), np.int64(n)))

    def adam_update_device(self, p, g, m, v, hyper, b1, b2, eps):
        """Adam with (lr / bias1, 1 / bias2) read from the float64 device array ``hyper``."""
        self._check(p, g, m, v)
        n = p.size
        self._k["adam_dev"](self._adam_grid(n), (_THREADS,), (
            p, g, m, v, hyper, np.float64(b1), np.float64(b2), np.float64(eps), np.int64(n)))

    def _adam_grid(self, n):
        # grid-stride loop: enough blocks to fill the device, not one per element
        return (max(1, min((int(n) + _THREADS - 1) // _THREADS, 4096)),)

    # ------------------------------------------------------------------ embedding
    def embedding_grad_segments(self, dx, order, seg_start, ids, rows, dense):
        """Per-word sums of ``dx`` rows into ``rows`` (S, W) and scattered into ``dense`` (V, W).

        ``order`` lists positions grouped by word, ``seg_start`` (S+1) where each
        word's group starts, ``ids`` (S) its word (< 0: an empty padding segment).
        The sum runs in ``order``, so the result is the same on every run.
        """
        S, W = rows.shape
        self._check(dx, rows, dense)
        dense.fill(0)
        if S == 0:
            return
        self._k["embed_rows"](_grid(S * W), (_THREADS,), (
            dx, _ld(dx), order, seg_start, np.int32(S), np.int32(W), rows))
        self._k["embed_scatter"](_grid(S * W), (_THREADS,),
                                 (rows, ids, np.int32(S), np.int32(W), dense))
