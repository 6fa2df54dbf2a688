"""The BLAS FFI: OpenBLAS entry points NumPy does not offer, called from compiled code.

Called through their addresses (a ctypes call costs more than the work at the
recurrent steps' sizes): the out-of-place transpose (omatcopy), the float32 GEMM that
adds its product to its output (sgemm with beta = 1: ``gemm_acc``) and the GEMM of
``a @ b.T`` (``gemm_bt``), the calls numpy.matmul makes for those layouts. The
kernels that call them are built once per process by ``ffi()`` for the BLAS integer
width of the library found (LP64 or ILP64), and cached under names that carry it.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import openblas
from .jit import stable

_FFI = None


@stable("read_ticks.v2", intrinsic)
def read_ticks(typingctx):
    # the CPU's time-stamp counter (llvm.readcyclecounter): how long the GEMMs inside a
    # compiled time loop took, read only while a GEMM recorder listens
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@njit(cache=True, nogil=True)
def ticks_now():
    return read_ticks()


def ffi():
    """The FFI's namespace, built once: ``addresses`` (omatcopy's per dtype),
    ``gemm_addresses`` (sgemm's, float32) and the compiled calls; both address maps
    empty where no OpenBLAS is found (another BLAS: NumPy's calls serve)."""
    global _FFI
    if _FFI is None:
        try:
            library = openblas.loaded()[0]
        except Exception:  # another BLAS, no threadpoolctl
            library = None
        _FFI = (
            SimpleNamespace(addresses={}, gemm_addresses={}) if library is None else _build(library)
        )
    return _FFI


def _address(library, name):
    fn = library.symbol(name)
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


def _build(library):
    ilp64 = library.blasint is ctypes.c_int64
    width = "ilp64" if ilp64 else "lp64"
    addresses = {
        np.dtype(dtype): _address(library, name)
        for dtype, name in ((np.float32, "cblas_somatcopy"), (np.float64, "cblas_domatcopy"))
    }
    gemm_addresses = {np.dtype(np.float32): _address(library, "cblas_sgemm")}
    call_omatcopy, call_gemm = _intrinsics(ilp64, width)
    return SimpleNamespace(
        addresses={k: v for k, v in addresses.items() if v is not None},
        gemm_addresses={k: v for k, v in gemm_addresses.items() if v is not None},
        width=width,
        **_calls(width, call_omatcopy, call_gemm),
    )


def _emit_call(builder, ilp64, address, args, kinds):
    """Call the C function at ``address`` (an intp) with ``args`` passed as ``kinds`` say:
    "i32" (a 32-bit int, an intp truncated), "int" (a BLAS integer, from an intp), "ptr" (a
    pointer, from an intp), "real" (as it is)."""
    i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
    blasint = ir.IntType(64 if ilp64 else 32)
    arg_types, values = [], []
    for value, kind in zip(args, kinds):
        if kind == "i32":
            arg_types.append(i32)
            values.append(value if value.type == i32 else builder.trunc(value, i32))
        elif kind == "int":
            arg_types.append(blasint)
            values.append(value if ilp64 else builder.trunc(value, blasint))
        elif kind == "ptr":
            arg_types.append(i8p)
            values.append(builder.inttoptr(value, i8p))
        else:
            arg_types.append(value.type)
            values.append(value)
    fnty = ir.FunctionType(ir.VoidType(), arg_types)
    builder.call(builder.inttoptr(address, fnty.as_pointer()), values)


def _constants(*values):
    """32-bit integer constants of the generated code (the CBLAS enums)."""
    return [ir.Constant(ir.IntType(32), v) for v in values]


def _intrinsics(ilp64, width):
    """The calls of omatcopy and sgemm through an address, with this BLAS's integer width.
    (Their code closes over ``ilp64`` alone: Numba keys the cached kernels that call them by
    what they close over, pickled.)"""

    @stable(f"call_omatcopy.{width}.v3", intrinsic)
    def call_omatcopy(typingctx, fn, rows, cols, alpha, a, lda, b, ldb):
        # fn(CblasRowMajor, CblasTrans, rows, cols, alpha, a, lda, b, ldb); integers as
        # this library's BLAS integers, pointers given as integers
        def codegen(context, builder, signature, args):
            order, trans = _constants(openblas.CBLAS_ROW_MAJOR, openblas.CBLAS_TRANS)
            _emit_call(builder, ilp64, args[0], [order, trans, *args[1:]],
                       ("i32", "i32", "int", "int", "real", "ptr", "int", "ptr", "int"))
            return context.get_dummy_value()

        intp = types.intp
        return types.void(intp, intp, intp, alpha, intp, intp, intp, intp), codegen

    @stable(f"call_gemm.{width}.v3", intrinsic)
    def call_gemm(typingctx, fn, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        # fn(CblasRowMajor, CblasNoTrans, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
        # ldc): c = alpha a op(b) + beta c
        def codegen(context, builder, signature, args):
            order, no_trans = _constants(openblas.CBLAS_ROW_MAJOR, openblas.CBLAS_NO_TRANS)
            _emit_call(builder, ilp64, args[0], [order, no_trans, *args[1:]],
                       ("i32", "i32", "i32", "int", "int", "int", "real", "ptr", "int", "ptr",
                        "int", "real", "ptr", "int"))
            return context.get_dummy_value()

        intp = types.intp
        return types.void(intp, intp, intp, intp, intp, alpha, intp, intp, intp, intp, alpha, intp,
                          intp), codegen

    return call_omatcopy, call_gemm


def _calls(width, call_omatcopy, call_gemm):
    """The compiled GEMMs and transposes over the intrinsics."""
    no_trans, trans = np.intp(openblas.CBLAS_NO_TRANS), np.intp(openblas.CBLAS_TRANS)

    @stable(f"gemm_acc.{width}", cache=True, nogil=True)
    def gemm_acc(fn, a, b, c):
        # c += a @ b (beta = 1), every operand C-contiguous
        m, k = a.shape
        one = a.dtype.type(1.0)
        call_gemm(
            fn,
            no_trans,
            np.intp(m),
            np.intp(b.shape[1]),
            np.intp(k),
            one,
            np.intp(a.ctypes.data),
            np.intp(k),
            np.intp(b.ctypes.data),
            np.intp(b.shape[1]),
            one,
            np.intp(c.ctypes.data),
            np.intp(c.shape[1]),
        )

    @stable(f"gemm_bt.{width}", cache=True, nogil=True)
    def gemm_bt(fn, a, b, c):
        # c = a @ b.T (beta = 0); a (m, k), b (n, k), c (m, n), each with unit column stride
        # (rows may be farther apart): the call numpy.matmul makes for these layouts when
        # m, n > 1 (it calls gemv for one row or column)
        m, k = a.shape
        item = a.itemsize
        call_gemm(
            fn,
            trans,
            np.intp(m),
            np.intp(b.shape[0]),
            np.intp(k),
            a.dtype.type(1.0),
            np.intp(a.ctypes.data),
            np.intp(a.strides[0] // item),
            np.intp(b.ctypes.data),
            np.intp(b.strides[0] // item),
            a.dtype.type(0.0),
            np.intp(c.ctypes.data),
            np.intp(c.strides[0] // item),
        )

    @stable(f"omatcopy.{width}", cache=True, nogil=True)
    def omatcopy(fn, src, out):
        # out = src.T; alpha = 1 copies each element as it is (NaNs and signed zeros too)
        rows, cols = src.shape
        one = src.dtype.type(1.0)
        call_omatcopy(
            fn,
            np.intp(rows),
            np.intp(cols),
            one,
            np.intp(src.ctypes.data),
            np.intp(cols),
            np.intp(out.ctypes.data),
            np.intp(rows),
        )

    @stable(f"rows_from_T.{width}", nogil=True)
    def rows_from_T(fn, src_T, out, lo, hi):
        # out[lo:hi] = src_T[:, lo:hi].T; src_T (H, m) and out (rows, H) C-contiguous
        if hi > lo:
            H, m = src_T.shape
            item = src_T.itemsize
            call_omatcopy(
                fn,
                np.intp(H),
                np.intp(hi - lo),
                src_T.dtype.type(1.0),
                np.intp(src_T.ctypes.data + lo * item),
                np.intp(m),
                np.intp(out.ctypes.data + lo * out.shape[1] * item),
                np.intp(out.shape[1]),
            )

    return {
        "gemm_acc": gemm_acc,
        "gemm_bt": gemm_bt,
        "omatcopy": omatcopy,
        "rows_from_T": rows_from_T,
    }
