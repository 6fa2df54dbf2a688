"""cuBLAS gemm called directly, so that the GPU step's matrix products can be captured in a
CUDA graph (CuPy refuses its own cuBLAS calls while a stream is captured)."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np


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
        if (b.shape[0] != K or out.shape != (M, N) or la is None or lb is None or lc is None
                or lc[0] != 0):
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
