"""The CUDA C source of the fused kernels (kernels/cuda.py compiles it, NVRTC by CuPy).

One program, instantiated per dtype by replacing ``__REAL__`` with float or double.
Each kernel is one thread per element (per row for the softmax), row strides passed
explicitly; ``KERNEL_NAMES`` lists every kernel GpuKernels fetches from the module.
"""

from __future__ import annotations

import numpy as np

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
    for (int o = 16; o > 0; o >>= 1) {
        U w = __shfl_down_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
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
extern "C" __global__ void embed_scatter(const real* rows, const int* ids, int S, int W,
                                         real* dense) {
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


def kernel_source(dtype) -> str:
    """The CUDA C source of the fused kernels for ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in CUDA_DTYPES:
        raise TypeError(f"GPU kernels: float32 or float64, got {dtype}")
    return _SOURCE.replace("__REAL__", "float" if dtype == np.float32 else "double")
