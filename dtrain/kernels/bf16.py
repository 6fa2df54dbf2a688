"""bf16 GEMMs with float32 results (MKL's ``cblas_gemm_bf16bf16f32``) and float32 -> bf16 rounding.

Phase 1 of issue 24: the library, loaded from the optional extra (``pip install -e '.[bf16]'``,
the pip package ``mkl``), and the pieces the bf16 step will be built from. Why MKL and not
oneDNN, and the error bound of these GEMMs: docs/precision.md.

Invariants:
- A bf16 value is stored as its bit pattern in a ``uint16``: the upper half of the float32
  of the same value, so ``bits << 16`` read as float32 is the value exactly (``from_bf16``).
- ``round_bits`` / ``to_bf16`` round to nearest, ties to even, over the whole range (float32
  subnormals become bf16 subnormals or zero by the same rule, values at or beyond bf16's
  largest finite value plus half an ulp become infinity); infinities stay infinities; a NaN
  stays a NaN of the same sign (made quiet, so truncating its payload cannot make it inf).
- ``gemm`` computes ``out = alpha op(a) op(b) + beta out`` with bf16 operands: every product
  of two bf16 values is exact in float32, the sums are float32 (MKL's order), ``out`` float32.
- MKL is loaded with the threading layer given to the first ``load`` and keeps it. The
  default, ``"sequential"``, never starts a thread: MKL runs on the calling thread, so the
  kernels' pool, which owns the rank's threads, can split a GEMM by rows with ``gemm_rows``
  and no second pool spins against it.
- The compiled forms (``gemm_arrays``, ``gemm_rows``) take the entry point's address
  (``library().gemm_address``) as an argument, as the OpenBLAS calls in the CPU kernels do:
  the compiled code is the same wherever the library lies and can be cached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112
THREADING_LAYERS = {"intel": 0, "sequential": 1, "gnu": 3}  # MKL_THREADING_* of mkl_service.h
EXTRA_HINT = "pip install -e '.[bf16]' (the pip package mkl)"
INT32_MAX = 2**31 - 1  # MKL's LP64 interface: 32-bit integers


# ---------------------------------------------------------------------------------------------
# float32 -> bf16, round to nearest even: a scalar on bit patterns, fusable into other kernels


@njit(cache=True, nogil=True, inline="always")
def round_bits(u):
    """bf16 bits (uint16) of the float32 whose bits are ``u`` (uint32), rounded to nearest even.

    Adding 0x7FFF plus the lowest kept bit, then dropping 16 bits, is round-half-to-even on
    the magnitude; a carry out of the significand moves the exponent up (to infinity past
    the largest finite value), which is what rounding must do. NaN is excepted: its payload
    may lie in the dropped bits only, so the quiet bit is set to keep it a NaN."""
    u = np.uint32(u)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x0040))
    lowest_kept = np.uint64((u >> np.uint32(16)) & np.uint32(1))
    return np.uint16((np.uint64(u) + np.uint64(0x7FFF) + lowest_kept) >> np.uint64(16))


@intrinsic
def float32_bits(typingctx, x):
    """The bits of float32 ``x`` as a uint32 (a bit cast, no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(cache=True, nogil=True, inline="always")
def round_value(x):
    """bf16 bits (uint16) of float32 ``x``, rounded to nearest even: what a kernel that
    computes an operand in float32 calls to store it as bf16."""
    return round_bits(float32_bits(np.float32(x)))


@njit(cache=True, nogil=True)
def round_row(src, dst):
    """dst[i] = bf16 bits of src[i] for one row: src float32, dst uint16 (any strides)."""
    for i in range(src.shape[0]):
        dst[i] = round_value(src[i])


@njit(cache=True, nogil=True)
def _round_flat(src_bits, dst):
    for i in range(src_bits.shape[0]):
        dst[i] = round_bits(src_bits[i])


def to_bf16(x, out=None) -> np.ndarray:
    """bf16 bits (uint16, the shape of ``x``) of float32 ``x``, rounded to nearest even."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(src.shape, np.uint16)
    elif out.dtype != np.uint16 or out.shape != src.shape or not out.flags.c_contiguous:
        raise ValueError(f"to_bf16: out must be a C-contiguous uint16 array of shape {src.shape}")
    _round_flat(src.reshape(-1).view(np.uint32), out.reshape(-1))
    return out


def from_bf16(bits) -> np.ndarray:
    """float32 values of bf16 bits (exact: bf16 is the upper half of a float32)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise ValueError(f"from_bf16: expected uint16 bf16 bits, got {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------------------------
# The library


class Mkl:
    """MKL's single dynamic library, LP64 interface, one threading layer, loaded once."""

    def __init__(self, path: str, threading: str):
        self.path, self.threading = path, threading
        self.lib = ctypes.CDLL(path)
        # layers must be chosen before MKL's first computation; each call returns the layer in
        # force, which differs from ours if something in this process called MKL first
        got = self.lib.MKL_Set_Threading_Layer(THREADING_LAYERS[threading])
        if got != THREADING_LAYERS[threading]:
            raise RuntimeError(f"MKL was already started with threading layer {got}, "
                               f"not {threading}")
        if self.lib.MKL_Set_Interface_Layer(0) != 0:  # MKL_INTERFACE_LP64
            raise RuntimeError("MKL was already started with the ILP64 interface "
                               "(MKL_INTERFACE_LAYER)")

        class Version(ctypes.Structure):  # MKLVersion of mkl_types.h
            _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                        ("status", ctypes.c_char_p), ("build", ctypes.c_char_p),
                        ("processor", ctypes.c_char_p), ("platform", ctypes.c_char_p)]

        v = Version()
        self.lib.MKL_Get_Version(ctypes.byref(v))
        self.version = f"{v.major}.{v.minor}.{v.update}"
        try:  # the pip package's version (2026.2.1 ships oneMKL 2026.0.2)
            from importlib import metadata

            self.package = metadata.version("mkl")
        except Exception:
            self.package = "not from pip"
        # the instruction set MKL dispatches to (after MKL_ENABLE_INSTRUCTIONS, if set)
        self.processor = (v.processor or b"").decode(errors="replace")
        self.gemm_address = ctypes.cast(self.lib.cblas_gemm_bf16bf16f32, ctypes.c_void_p).value

    @property
    def code_path(self) -> str:
        """"amx" (AMX-BF16 tiles), "avx512_bf16" (AVX512-BF16 dot products) or "none" (bf16
        converted to float32 in software), from what MKL reports it dispatches to."""
        p = self.processor.lower()
        if "amx" in p and "bf16" in p:
            return "amx"
        if "bf16" in p or "bfloat16" in p:
            return "avx512_bf16"
        return "none"

    def describe(self) -> str:
        """One line for a run's header: library, version, code path, threading layer."""
        return (f"MKL {self.version} (pip mkl {self.package}), code path {self.code_path}, "
                f"{self.threading} threading")


def find_mkl_rt() -> str | None:
    """Path of libmkl_rt from the pip package ``mkl`` (or the environment's lib/), or None."""
    try:
        from importlib import metadata

        for f in metadata.distribution("mkl").files or ():
            if f.name.startswith("libmkl_rt.so"):
                path = str(f.locate())
                if os.path.exists(path):
                    return os.path.realpath(path)
    except Exception:  # not installed with pip, or no RECORD
        pass
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if hits:
            return hits[-1]
    return ctypes.util.find_library("mkl_rt")


_loaded: dict = {}


def load(threading: str = "sequential") -> Mkl:
    """The MKL library (loaded on the first call; later calls must ask for the same layer).

    Raises ImportError when the extra is not installed, RuntimeError when MKL cannot be set up."""
    if threading not in THREADING_LAYERS:
        raise ValueError(f"threading must be one of {sorted(THREADING_LAYERS)}, got {threading!r}")
    if "mkl" in _loaded:
        mkl = _loaded["mkl"]
        if mkl.threading != threading:
            raise RuntimeError(f"MKL is loaded with {mkl.threading} threading, not {threading}")
        return mkl
    path = find_mkl_rt()
    if path is None:
        raise ImportError(f"MKL's libmkl_rt was not found: {EXTRA_HINT}")
    try:
        _loaded["mkl"] = Mkl(path, threading)
    except OSError as exc:
        raise ImportError(f"MKL's {path} does not load ({exc}): {EXTRA_HINT}") from exc
    return _loaded["mkl"]


def available(threading: str = "sequential") -> tuple[bool, str]:
    """(True, what will run) when bf16 GEMMs run on AMX here, else (False, why, one line).

    False without the extra, and when MKL dispatches to no AMX-BF16 (an older CPU, or an
    MKL_ENABLE_INSTRUCTIONS cap): MKL still gives correct results there, but slower than the
    float32 path. With AVX512-BF16 alone MKL's bf16 GEMM ran at about two thirds of float32
    sgemm's speed on this model's shapes, and with neither no faster (docs/precision.md)."""
    try:
        mkl = load(threading)
    except (ImportError, RuntimeError) as exc:
        return False, f"bf16 GEMMs unavailable: {exc}"
    if mkl.code_path != "amx":
        what = "AVX512-BF16 without AMX" if mkl.code_path == "avx512_bf16" else "no bf16 unit"
        return False, (f"bf16 GEMMs would be slower than float32 here: MKL {mkl.version} "
                       f"dispatches to {what} ('{mkl.processor}'), AMX-BF16 is needed")
    return True, mkl.describe()


def library() -> Mkl:
    """The loaded library (``load()`` with its default layer unless loaded before)."""
    return _loaded["mkl"] if "mkl" in _loaded else load()


# ---------------------------------------------------------------------------------------------
# The GEMM, callable from compiled code


@intrinsic
def call_gemm_bf16(typingctx, fn, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """fn(CblasRowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) with
    fn the address of cblas_gemm_bf16bf16f32; pointers and integers given as intp (the
    integers truncated to MKL's 32-bit LP64 ints), alpha and beta float32."""
    if alpha != types.float32 or beta != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32, f32, i8p = ir.IntType(32), ir.FloatType(), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i32, i32, i32, f32, i8p, i32,
                                               i8p, i32, f32, i8p, i32])
        target = builder.inttoptr(args[0], fnty.as_pointer())
        n32 = [builder.trunc(v, i32) for v in args[1:6]]
        builder.call(target, [ir.Constant(i32, CBLAS_ROW_MAJOR), *n32, args[6],
                              builder.inttoptr(args[7], i8p), builder.trunc(args[8], i32),
                              builder.inttoptr(args[9], i8p), builder.trunc(args[10], i32),
                              args[11], builder.inttoptr(args[12], i8p),
                              builder.trunc(args[13], i32)])
        return context.get_dummy_value()

    ip = types.intp
    return types.void(ip, ip, ip, ip, ip, ip, types.float32, ip, ip, ip, ip, types.float32,
                      ip, ip), codegen


@njit(cache=True, nogil=True, inline="always")
def leading(x):
    """Leading dimension (elements between rows) of a 2-D array with unit column stride, at
    least 1 and at least a row (what BLAS asks even of a matrix with one row or none)."""
    ld = x.strides[0] // x.itemsize if x.shape[0] > 1 else x.shape[1]
    return max(ld, x.shape[1], 1)


@njit(cache=True, nogil=True)
def gemm_rows(fn, a, b, out, trans_a, trans_b, alpha, beta, lo, hi):
    """Rows [lo, hi) of out = alpha op(a) op(b) + beta out (the arguments checked by ``gemm``;
    a thread of a pool may take one block of rows each). a and b uint16 (bf16 bits), out
    float32, each with unit column stride; a is (k, m) when trans_a, b is (n, k) when
    trans_b."""
    if hi <= lo:
        return
    k = a.shape[0] if trans_a else a.shape[1]
    lda, ldb, ldc = leading(a), leading(b), leading(out)
    # row i of op(a) starts at a[i] (no transpose) or at column i of a (transposed)
    a_ptr = a.ctypes.data + (lo * 2 if trans_a else lo * lda * 2)
    call_gemm_bf16(fn, CBLAS_TRANS if trans_a else CBLAS_NO_TRANS,
                   CBLAS_TRANS if trans_b else CBLAS_NO_TRANS, hi - lo, out.shape[1], k,
                   np.float32(alpha), a_ptr, lda, b.ctypes.data, ldb, np.float32(beta),
                   out.ctypes.data + lo * ldc * 4, ldc)


@njit(cache=True, nogil=True)
def gemm_arrays(fn, a, b, out, trans_a, trans_b, alpha, beta):
    """out = alpha op(a) op(b) + beta out, every row: ``gemm_rows`` over all of out."""
    gemm_rows(fn, a, b, out, trans_a, trans_b, alpha, beta, 0, out.shape[0])


def _leading(x, name):
    """x's leading dimension in elements; x must be 2-D with unit column stride."""
    if x.ndim != 2:
        raise ValueError(f"gemm: {name} must be 2-D, got shape {x.shape}")
    item = x.itemsize
    if x.shape[1] > 1 and x.strides[1] != item:
        raise ValueError(f"gemm: {name} needs unit column stride (got strides {x.strides})")
    ld = x.strides[0] // item if x.shape[0] > 1 else x.shape[1]
    if x.strides[0] % item or ld < max(1, x.shape[1]) or ld > INT32_MAX:
        raise ValueError(f"gemm: {name}'s rows must lie at least a row apart (strides {x.strides})")
    return ld


def check_operands(a, b, out, trans_a=False, trans_b=False):
    """(m, n, k) of out = op(a) op(b), or ValueError naming the argument that does not fit."""
    for name, x, dtype in (("a", a, np.uint16), ("b", b, np.uint16), ("out", out, np.float32)):
        if not isinstance(x, np.ndarray) or x.dtype != dtype:
            got = getattr(x, "dtype", type(x).__name__)
            raise ValueError(f"gemm: {name} must be a NumPy {np.dtype(dtype).name} array, "
                             f"got {got}")
        _leading(x, name)
    m, k = (a.shape[::-1] if trans_a else a.shape)
    kb, n = (b.shape[::-1] if trans_b else b.shape)
    if kb != k or out.shape != (m, n):
        raise ValueError(f"gemm: op(a) {m}x{k} times op(b) {kb}x{n} does not give out {out.shape}")
    if not out.flags.writeable:
        raise ValueError("gemm: out is read-only")
    if max(m, n, k) > INT32_MAX:
        raise ValueError(f"gemm: dimensions {m}x{k}x{n} exceed MKL's 32-bit integers")
    return m, n, k


def gemm(a, b, out, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """out = alpha op(a) op(b) + beta out, in place; returns out.

    a, b: uint16 arrays of bf16 bits (``to_bf16``), a (m, k) or (k, m) with trans_a, b (k, n)
    or (n, k) with trans_b; out: float32 (m, n). Each with unit column stride (row views of
    larger arrays are fine). Products exact, sums in float32 (error bound: docs/precision.md).
    """
    m, n, k = check_operands(a, b, out, trans_a, trans_b)
    if m and n:
        gemm_arrays(library().gemm_address, a, b, out, bool(trans_a), bool(trans_b),
                    float(alpha), float(beta))
    return out
