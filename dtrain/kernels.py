"""Fused kernels for the hot elementwise work of a training step.

The plain xp code in layers.py and optim.py is the reference; these kernels
do the same arithmetic in one pass over memory instead of one pass per ufunc:

* the LSTM gate forward (sigmoid/tanh of the gates, c and h update) and its
  backward, the RNN tanh step and its backward,
* the softmax cross-entropy loss and its gradient, in place over the scores,
* Adam over the flat parameter buffer.

On the CPU they are Numba functions (compiled on first use, cached on disk);
on the GPU, CuPy elementwise/raw kernels (see ``gpu_kernels``). ``for_arrays``
picks the set for an array module, or returns None when Numba is missing, so
the plain path always works.
"""

from __future__ import annotations

import math
import os

import numpy as np

_CPU = None


def _build_cpu(parallel):
    from numba import njit, prange

    opts = {"cache": True, "fastmath": False, "nogil": True}

    @njit(inline="always")
    def sigm(x):
        # logistic through tanh: stable for any finite x (no exp overflow)
        return 0.5 * (1.0 + math.tanh(0.5 * x))

    @njit(parallel=parallel, **opts)
    def lstm_fwd(a, r, prev_c, c, tc, h):
        n, G = a.shape
        H = G // 4
        for row in prange(n):
            for j in range(H):
                i = sigm(a[row, j] + r[row, j])
                f = sigm(a[row, H + j] + r[row, H + j])
                o = sigm(a[row, 2 * H + j] + r[row, 2 * H + j])
                g = math.tanh(a[row, 3 * H + j] + r[row, 3 * H + j])
                a[row, j] = i
                a[row, H + j] = f
                a[row, 2 * H + j] = o
                a[row, 3 * H + j] = g
                cc = f * prev_c[row, j] + i * g
                c[row, j] = cc
                t = math.tanh(cc)
                tc[row, j] = t
                h[row, j] = o * t

    @njit(parallel=parallel, **opts)
    def lstm_bwd(d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc):
        n, G = a.shape
        H = G // 4
        for row in prange(n):
            carried = row < n_next
            for j in range(H):
                i = a[row, j]
                f = a[row, H + j]
                o = a[row, 2 * H + j]
                g = a[row, 3 * H + j]
                t = tc[row, j]
                dh = dh_up[row, j]
                dc = 0.0
                if carried:
                    dh += dh_rec[row, j]
                    dc = dc_rec[row, j]
                dc += dh * o * (1.0 - t * t)
                d[row, j] = dc * g * i * (1.0 - i)
                d[row, H + j] = dc * prev_c[row, j] * f * (1.0 - f)
                d[row, 2 * H + j] = dh * t * o * (1.0 - o)
                d[row, 3 * H + j] = dc * i * (1.0 - g * g)
                dc_rec[row, j] = dc * f

    @njit(parallel=parallel, **opts)
    def rnn_fwd(a, r):
        n, H = a.shape
        for row in prange(n):
            for j in range(H):
                a[row, j] = math.tanh(a[row, j] + r[row, j])

    @njit(parallel=parallel, **opts)
    def rnn_bwd(d, dh_up, dh_rec, n_next, h):
        n, H = h.shape
        for row in prange(n):
            carried = row < n_next
            for j in range(H):
                dh = dh_up[row, j]
                if carried:
                    dh += dh_rec[row, j]
                hv = h[row, j]
                d[row, j] = dh * (1.0 - hv * hv)

    @njit(parallel=parallel, **opts)
    def softmax_xent(scores, targets, inv_norm, row_loss):
        M, V = scores.shape
        for row in prange(M):
            m = scores[row, 0]
            for k in range(1, V):
                if scores[row, k] > m:
                    m = scores[row, k]
            y = targets[row]
            shifted_y = scores[row, y] - m
            s = 0.0
            for k in range(V):
                e = math.exp(scores[row, k] - m)
                scores[row, k] = e
                s += e
            row_loss[row] = math.log(s) - shifted_y
            scale = inv_norm / s
            for k in range(V):
                scores[row, k] *= scale
            scores[row, y] -= inv_norm

    @njit(parallel=parallel, **opts)
    def adam(p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        step = lr / bias1
        inv_b2 = 1.0 / bias2
        for k in prange(p.size):
            gk = g[k]
            mk = b1 * m[k] + (1.0 - b1) * gk
            vk = b2 * v[k] + (1.0 - b2) * gk * gk
            m[k] = mk
            v[k] = vk
            p[k] -= step * mk / (math.sqrt(vk * inv_b2) + eps)

    return lstm_fwd, lstm_bwd, rnn_fwd, rnn_bwd, softmax_xent, adam


class CpuKernels:
    """Numba kernels with the call signatures layers.py and optim.py use."""

    name = "numba"

    def __init__(self, dtype):
        global _CPU
        parallel = os.environ.get("DTRAIN_PARALLEL_KERNELS", "0") == "1"
        if _CPU is None:
            _CPU = _build_cpu(parallel)
        (self._lstm_fwd, self._lstm_bwd, self._rnn_fwd, self._rnn_bwd,
         self._softmax_xent, self._adam) = _CPU
        self.dtype = np.dtype(dtype)
        self._row_loss = np.empty(0, dtype=np.float64)

    def lstm_step_forward(self, a, r, prev_c, c, tc, h):
        n = a.shape[0]
        self._lstm_fwd(a, r, prev_c[:n], c, tc, h)

    def lstm_step_backward(self, d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc):
        self._lstm_bwd(d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc)

    def rnn_step_forward(self, a, r):
        self._rnn_fwd(a, r)

    def rnn_step_backward(self, d, dh_up, dh_rec, n_next, h):
        self._rnn_bwd(d, dh_up, dh_rec, n_next, h)

    def softmax_cross_entropy(self, scores, targets, normalizer):
        """Loss (float) and, in place in ``scores``, its gradient."""
        M = scores.shape[0]
        if self._row_loss.size < M:
            self._row_loss = np.empty(M, dtype=np.float64)
        row_loss = self._row_loss[:M]
        self._softmax_xent(scores, targets, 1.0 / normalizer, row_loss)
        return float(row_loss.sum()) / normalizer

    def adam_update(self, p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        self._adam(p, g, m, v, lr, b1, b2, eps, bias1, bias2)


def set_num_threads(n):
    """Threads of the CPU kernels (kept equal to the BLAS threads of the rank)."""
    try:
        import numba

        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    except Exception:
        pass


def for_arrays(xp, dtype):
    """The fused kernel set for array module ``xp``, or None (plain xp path)."""
    if os.environ.get("DTRAIN_NO_KERNELS"):
        return None
    if xp is np:
        try:
            return CpuKernels(dtype)
        except ImportError:
            return None
    try:
        from .gpu_kernels import GpuKernels
    except ImportError:
        return None
    return GpuKernels(dtype)
