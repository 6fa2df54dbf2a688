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
The source is compiled once per dtype (float or double) by NVRTC on first use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import NamedTuple

import numpy as np

from .base import KernelSet

_SOURCE = r"""
typedef __REAL__ real;

__device__ __forceinline__ float  tanh_(float x)  { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
__device__ __forceinline__ float  exp_(float x)   { return expf(x); }
__device__ __forceinline__ double exp_(double x)  { return exp(x); }

// logistic through one tanh, as the CPU kernels: stable for any finite x
__device__ __forceinline__ real sigm(real x) {
    return (real)0.5 * ((real)1 + tanh_((real)0.5 * x));
}

extern "C" __global__ void lstm_fwd(real* a, const real* r, const real* prev_c,
        real* c, real* tc, real* h, int n, int H,
        int lda, int ldr, int ldp, int ldc, int ldt, int ldh) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * H) return;
    int row = (int)(idx / H), j = (int)(idx % H);
    real* ar = a + (size_t)row * lda;
    const real* rr = r + (size_t)row * ldr;
    real i = sigm(ar[j] + rr[j]);
    real f = sigm(ar[H + j] + rr[H + j]);
    real o = sigm(ar[2 * H + j] + rr[2 * H + j]);
    real g = tanh_(ar[3 * H + j] + rr[3 * H + j]);
    ar[j] = i; ar[H + j] = f; ar[2 * H + j] = o; ar[3 * H + j] = g;
    real cc = f * prev_c[(size_t)row * ldp + j] + i * g;
    c[(size_t)row * ldc + j] = cc;
    real t = tanh_(cc);
    tc[(size_t)row * ldt + j] = t;
    h[(size_t)row * ldh + j] = o * t;
}

extern "C" __global__ void lstm_bwd(real* d, const real* dh_up, const real* dh_rec,
        real* dc_rec, int n_next, const real* a, const real* prev_c, const real* tc,
        int n, int H, int ldd, int ldu, int ldr, int ldcr, int lda, int ldp, int ldt) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * H) return;
    int row = (int)(idx / H), j = (int)(idx % H);
    const real* ar = a + (size_t)row * lda;
    real i = ar[j], f = ar[H + j], o = ar[2 * H + j], g = ar[3 * H + j];
    real t = tc[(size_t)row * ldt + j];
    real dh = dh_up[(size_t)row * ldu + j];
    real dc = 0;
    if (row < n_next) {  // rows still inside a caption at t+1 carry dh and dc back
        dh += dh_rec[(size_t)row * ldr + j];
        dc = dc_rec[(size_t)row * ldcr + j];
    }
    dc += dh * o * ((real)1 - t * t);
    real* dr = d + (size_t)row * ldd;
    dr[j] = dc * g * i * ((real)1 - i);
    dr[H + j] = dc * prev_c[(size_t)row * ldp + j] * f * ((real)1 - f);
    dr[2 * H + j] = dh * t * o * ((real)1 - o);
    dr[3 * H + j] = dc * i * ((real)1 - g * g);
    dc_rec[(size_t)row * ldcr + j] = dc * f;
}

extern "C" __global__ void rnn_fwd(real* a, const real* r, int n, int H, int lda, int ldr) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * H) return;
    int row = (int)(idx / H), j = (int)(idx % H);
    real* p = a + (size_t)row * lda + j;
    *p = tanh_(*p + r[(size_t)row * ldr + j]);
}

extern "C" __global__ void rnn_bwd(real* d, const real* dh_up, const real* dh_rec, int n_next,
        const real* h, int n, int H, int ldd, int ldu, int ldr, int ldh) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * H) return;
    int row = (int)(idx / H), j = (int)(idx % H);
    real dh = dh_up[(size_t)row * ldu + j];
    if (row < n_next) dh += dh_rec[(size_t)row * ldr + j];
    real hv = h[(size_t)row * ldh + j];
    d[(size_t)row * ldd + j] = dh * ((real)1 - hv * hv);
}

extern "C" __global__ void gru_fwd(real* a, const real* r, const real* prev_h, real* hn, real* h,
        int n, int H, int lda, int ldr, int ldp, int ldn, int ldh) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * H) return;
    int row = (int)(idx / H), j = (int)(idx % H);
    real* ar = a + (size_t)row * lda;
    const real* rr = r + (size_t)row * ldr;
    real rg = sigm(ar[j] + rr[j]);
    real z = sigm(ar[H + j] + rr[H + j]);
    real hv = rr[2 * H + j];
    real ng = tanh_(ar[2 * H + j] + rg * hv);
    ar[j] = rg; ar[H + j] = z; ar[2 * H + j] = ng;
    hn[(size_t)row * ldn + j] = hv;
    h[(size_t)row * ldh + j] = ng + z * (prev_h[(size_t)row * ldp + j] - ng);
}

extern "C" __global__ void gru_bwd(real* dax, real* dah, const real* dh_up, const real* dh_rec,
        real* carry, int n_next, const real* a, const real* hn, const real* ph, int n, int H,
        int ldx, int ldah, int ldu, int ldr, int ldc, int lda, int ldn, int ldp) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * H) return;
    int row = (int)(idx / H), j = (int)(idx % H);
    real dh = dh_up[(size_t)row * ldu + j];
    if (row < n_next) {  // rows still inside a caption at t+1: through Wh and directly (z)
        dh += dh_rec[(size_t)row * ldr + j];
        dh += carry[(size_t)row * ldc + j];
    }
    const real* ar = a + (size_t)row * lda;
    real rg = ar[j], z = ar[H + j], ng = ar[2 * H + j];
    real one = (real)1;
    real dan = (one - z) * (one - ng * ng) * dh;
    real dar = dan * ((one - rg) * rg * hn[(size_t)row * ldn + j]);
    real daz = (ph[(size_t)row * ldp + j] - ng) * ((one - z) * z) * dh;
    real* xr = dax + (size_t)row * ldx;
    real* hr = dah + (size_t)row * ldah;
    xr[j] = dar; xr[H + j] = daz; xr[2 * H + j] = dan;
    hr[j] = dar; hr[H + j] = daz; hr[2 * H + j] = dan * rg;
    carry[(size_t)row * ldc + j] = dh * z;
}

template <typename U> __device__ __forceinline__ U warp_sum(U v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
template <typename U> __device__ __forceinline__ U warp_max(U v) {
    for (int o = 16; o > 0; o >>= 1) { U w = __shfl_down_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}
// block-wide reductions, the result on every thread (blockDim.x a multiple of 32)
__device__ double block_sum(double v, double* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) { v = lane < nw ? sh[lane] : 0.0; v = warp_sum(v); if (lane == 0) sh[32] = v; }
    __syncthreads();
    v = sh[32];
    __syncthreads();
    return v;
}
__device__ real block_max(real v, real* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) { v = lane < nw ? sh[lane] : sh[0]; v = warp_max(v); if (lane == 0) sh[32] = v; }
    __syncthreads();
    v = sh[32];
    __syncthreads();
    return v;
}

// One block per row of scores (M, V): loss of the row into row_loss (float64),
// gradient (softmax - onehot) * weight * inv_norm in place. weights may be absent
// (has_w = 0): every row counts.
extern "C" __global__ void softmax_xent(real* scores, const int* targets, const real* weights,
        int has_w, double inv_norm, double* row_loss, int M, int V, int lds) {
    __shared__ double shd[33];
    __shared__ real shr[33];
    int row = blockIdx.x;
    if (row >= M) return;
    real* x = scores + (size_t)row * lds;
    int y = targets[row];
    real xy = x[y];
    real m = x[0];
    for (int k = threadIdx.x; k < V; k += blockDim.x) m = x[k] > m ? x[k] : m;
    m = block_max(m, shr);
    double s = 0.0;
    for (int k = threadIdx.x; k < V; k += blockDim.x) s += (double)exp_(x[k] - m);
    s = block_sum(s, shd);
    double w = has_w ? (double)weights[row] : 1.0;
    if (threadIdx.x == 0) row_loss[row] = w * (log(s) - (double)(xy - m));
    double scale = w * inv_norm / s;
    for (int k = threadIdx.x; k < V; k += blockDim.x) x[k] = (real)((double)exp_(x[k] - m) * scale);
    __syncthreads();
    if (threadIdx.x == 0) x[y] = (real)((double)x[y] - w * inv_norm);
}

__device__ __forceinline__ void adam_body(real* p, const real* g, real* m, real* v,
        double step, double inv_b2, double b1, double b2, double eps, long long n) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        double gk = (double)g[k];
        double mk = b1 * (double)m[k] + (1.0 - b1) * gk;
        double vk = b2 * (double)v[k] + (1.0 - b2) * gk * gk;
        m[k] = (real)mk;
        v[k] = (real)vk;
        p[k] = (real)((double)p[k] - step * mk / (sqrt(vk * inv_b2) + eps));
    }
}
extern "C" __global__ void adam(real* p, const real* g, real* m, real* v, double step,
        double inv_b2, double b1, double b2, double eps, long long n) {
    adam_body(p, g, m, v, step, inv_b2, b1, b2, eps, n);
}
// hyper = (lr / (1 - b1^t), 1 / (1 - b2^t)) on the device: a captured graph replays
// this launch and picks up each step's values from there
extern "C" __global__ void adam_dev(real* p, const real* g, real* m, real* v, const double* hyper,
        double b1, double b2, double eps, long long n) {
    adam_body(p, g, m, v, hyper[0], hyper[1], b1, b2, eps, n);
}

// rows[s] = sum of dx[order[q]] for q in [seg_start[s], seg_start[s+1]), in that order
extern "C" __global__ void embed_rows(const real* dx, int ldx, const int* order,
        const int* seg_start, int S, int W, real* rows) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)S * W) return;
    int s = (int)(idx / W), k = (int)(idx % W);
    int lo = seg_start[s], hi = seg_start[s + 1];
    real acc = 0;
    for (int q = lo; q < hi; ++q) acc += dx[(size_t)order[q] * ldx + k];
    rows[idx] = acc;
}
// dense[ids[s]] = rows[s] for every real segment (ids < 0 mark padding)
extern "C" __global__ void embed_scatter(const real* rows, const int* ids, int S, int W, real* dense) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)S * W) return;
    int s = (int)(idx / W), k = (int)(idx % W);
    int id = ids[s];
    if (id >= 0) dense[(size_t)id * W + k] = rows[idx];
}
"""

# What the GPU path gives NVRTC through CuPy's RawModule. CuPy adds its own options
# (its default C++ standard, its include paths, -ftz=true, -arch=sm_XX of the device);
# tests/test_nvrtc.py compiles with that same set, no device needed.
NVRTC_OPTIONS = ()
CUDA_DTYPES = (np.float32, np.float64)  # the types ``real`` is instantiated as
# Every kernel GpuKernels asks the compiled module for (get_function)
KERNEL_NAMES = ("lstm_fwd", "lstm_bwd", "rnn_fwd", "rnn_bwd", "gru_fwd", "gru_bwd", "softmax_xent",
                "adam", "adam_dev", "embed_rows", "embed_scatter")


class CudaProgram(NamedTuple):
    """One CUDA C program as the GPU path compiles it, and the kernels it must define."""

    label: str
    source: str
    options: tuple
    kernels: tuple


def kernel_source(dtype) -> str:
    """The CUDA C source of the fused kernels for ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in CUDA_DTYPES:
        raise TypeError(f"GPU kernels: float32 or float64, got {dtype}")
    return _SOURCE.replace("__REAL__", "float" if dtype == np.float32 else "double")


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
        raise ValueError(f"GPU kernels: expected a 2-D array with contiguous rows, got {a.shape} {a.strides}")
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
        self._k["rnn_fwd"](_grid(n * H), (_THREADS,), (a, r, np.int32(n), np.int32(H), _ld(a), _ld(r)))

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
            a, r, prev_h, hn, h, np.int32(n), np.int32(H), _ld(a), _ld(r), _ld(prev_h), _ld(hn), _ld(h)))

    def gru_step_backward(self, dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h):
        n, G = a.shape
        H = G // 3
        if n == 0:
            return
        self._check(dax, dah, dh_up, dh_rec, carry, a, hn, prev_h)
        self._k["gru_bwd"](_grid(n * H), (_THREADS,), (
            dax, dah, dh_up, dh_rec, carry, np.int32(n_next), a, hn, prev_h, np.int32(n), np.int32(H),
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
        self._k["embed_scatter"](_grid(S * W), (_THREADS,), (rows, ids, np.int32(S), np.int32(W), dense))


# ---------------------------------------------------------------------------
# Matrix products that can be captured in a CUDA graph


def _load_cublas():
    """The libcublas CuPy uses (it is loaded by one small product first)."""
    import cupy

    cupy.ones((2, 2), np.float32) @ cupy.ones((2, 2), np.float32)
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({ln.split()[-1] for ln in maps if "/libcublas.so" in ln})
    except OSError:
        paths = []
    for path in paths:
        return ctypes.CDLL(path)
    name = ctypes.util.find_library("cublas")
    if name is None:
        raise OSError("libcublas is not loaded and not found")
    return ctypes.CDLL(name)


def _layout(x):
    """(op, ld) that make cuBLAS (column-major) see x transposed, or None.

    A row-major x is x^T in column-major order with ld = its row stride: op N.
    A column-major x (a transposed view) is x itself: op T."""
    R, C = x.shape
    it = x.itemsize
    s0, s1 = x.strides
    if (s1 == it or C == 1) and s0 % it == 0 and (R == 1 or s0 >= C * it):
        return 0, max(s0 // it, C, 1)
    if (s0 == it or R == 1) and s1 % it == 0 and (C == 1 or s1 >= R * it):
        return 1, max(s1 // it, R, 1)
    return None


class CublasMatmul:
    """``out = a @ b`` (2-D, float32/float64) by cuBLAS gemm called directly,
    on a handle of our own bound to one stream.

    cuBLAS supports stream capture, but CuPy refuses every cuBLAS call while a
    stream is being captured (a guard in its cublas.setStream; cupy/cupy#6290).
    While the GPU training step runs (eagerly or being captured), ``cupy.matmul``
    is this object, so the layers' ``xp.matmul(a, b, out=...)`` calls become
    capturable gemm launches (and cheaper to launch). Anything else falls
    through to CuPy. No TF32: the default math mode, exact float32.
    """

    def __init__(self, stream):
        import cupy

        self.cp = cupy
        self.fallback = cupy.matmul
        self.stream_ptr = stream.ptr
        lib = _load_cublas()
        vp, ci = ctypes.c_void_p, ctypes.c_int
        self._gemm = {}
        for dtype, name, ct in ((np.float32, "cublasSgemm_v2", ctypes.c_float),
                                (np.float64, "cublasDgemm_v2", ctypes.c_double)):
            fn = getattr(lib, name)
            fn.restype = ci
            fn.argtypes = [vp, ci, ci, ci, ci, ci, ctypes.POINTER(ct), vp, ci, vp, ci,
                           ctypes.POINTER(ct), vp, ci]
            self._gemm[np.dtype(dtype)] = (fn, ct(1.0), ct(0.0))
        self.handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self._check(lib.cublasSetStream_v2(self.handle, vp(stream.ptr)), "cublasSetStream")
        # a workspace of our own: nothing for cuBLAS to allocate while capturing
        self._workspace = cupy.empty(32 << 20, dtype=np.uint8)
        set_ws = getattr(lib, "cublasSetWorkspace_v2", None)
        if set_ws is not None:
            set_ws.argtypes = [vp, vp, ctypes.c_size_t]
            self._check(set_ws(self.handle, vp(self._workspace.data.ptr), self._workspace.nbytes),
                        "cublasSetWorkspace")
        self._lib = lib

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def __call__(self, a, b, out=None, **kwargs):
        gemm = self._gemm.get(getattr(a, "dtype", None))
        if (gemm is None or out is None or kwargs or a.ndim != 2 or b.ndim != 2 or out.ndim != 2
                or b.dtype != a.dtype or out.dtype != a.dtype
                or self.cp.cuda.get_current_stream().ptr != self.stream_ptr):
            return self.fallback(a, b, out=out, **kwargs)
        M, K = a.shape
        N = b.shape[1]
        la, lb, lc = _layout(a), _layout(b), _layout(out)
        if b.shape[0] != K or out.shape != (M, N) or la is None or lb is None or lc is None or lc[0] != 0:
            return self.fallback(a, b, out=out, **kwargs)
        if M == 0 or N == 0:
            return out
        if K == 0:
            out.fill(0)
            return out
        fn, one, zero = gemm
        # row-major C = A B is column-major C^T = B^T A^T
        self._check(fn(self.handle, lb[0], la[0], N, M, K, ctypes.byref(one), b.data.ptr, lb[1],
                       a.data.ptr, la[1], ctypes.byref(zero), out.data.ptr, lc[1]), "gemm")
        return out
