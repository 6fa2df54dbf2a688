"""Numba set-up of the CPU kernels: compile options, the caching decorator, exp32 and the gates.

Every kernel module compiles with ``OPTS`` (serial) or ``SPLIT_OPTS`` (a ``prange`` over
the parts of a split kernel). Kernels defined at module level are cached on disk by
Numba under their module's path, keyed by their bytecode. Kernels built inside a
function (the BLAS FFI, ``blas.py``, and the loops that call it, whose integer width
is known only at run time) close over the helpers they call, and Numba keys them by
those helpers pickled, with every helper those reach by name: it pickles a helper
with a uuid drawn anew in every process, so ``stable`` gives each such helper a fixed
one (without it every process would compile those kernels again instead of loading
them: tests/test_kernels.py checks).

Numba's exp and tanh are scalar libm calls, which keep a loop from vectorising: in
float32 the kernels use ``exp32``, dtrain's own vectorised exp (at most 1.1 ulp from
the correctly rounded result, against NumPy's 2.5); in float64 (the exactness checks)
they call libm.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# error_model="numpy": a division by zero gives inf/nan instead of raising, so LLVM may
# vectorise loops with divisions (with "python" every division is a branch). Serial
# kernels: Numba's OpenMP threads spin after a parallel region and fight OpenBLAS's
# threads for the cores; the split kernels (SPLIT_OPTS) run only on the shared pool
# (pool.py), where OpenBLAS's jobs run on the same threads. The hot loops run over one
# row at a time through 1-D views (ar = a[row]), which LLVM vectorises; 2-D indexing
# a[row, H + j] with a runtime H stays scalar.
OPTS = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}
SPLIT_OPTS = {"cache": True, "nogil": True, "error_model": "numpy", "parallel": True}

# The float32 softmax sums its gradient's columns (the vocabulary bias gradient) per block
# of this many rows, then the blocks in order: the same bits however its rows are split.
PARTIAL_ROWS = 64

# exp32's constants. EXP_POLY: degree-6 polynomial for e^r on [-ln2/2, ln2/2], fitted
# by least squares at 4,000 Chebyshev points in float64 and rounded to float32
# (tests/test_kernels.py fits it again and checks the result).
LOG2E = 1.4426950408889634
LN2_HI = 0.693145751953125  # ln 2 to 15 bits
LN2_LO = 1.428606765330187e-06  # float32(ln 2 - LN2_HI)
EXP_POLY = (
    1.0,
    1.0,
    0.5,
    0.16666415333747864,
    0.041666217148303986,
    0.008375131525099277,
    0.0013948584673926234,
)


def stable(name, *options, **keywords):
    """The one caching decorator for kernels built inside a function: ``njit(*options,
    **keywords)`` (or ``intrinsic`` when ``options`` is ``(intrinsic,)``) with the fixed
    uuid ``dtrain.kernels.cpu.<name>``, so that kernels which call it load from Numba's
    cache in every process. ``name`` carries whatever the compiled code depends on that
    Numba does not see (e.g. the BLAS integer width)."""

    def decorate(fn):
        compiled = (
            options[0](fn)
            if options and options[0] is intrinsic
            else njit(*options, **keywords)(fn)
        )
        try:
            compiled._set_uuid(f"dtrain.kernels.cpu.{name}")
        except (AttributeError, AssertionError):  # another Numba: compiled per process
            pass
        return compiled

    return decorate


@stable("bounds.v1", inline="always")
def bounds(n, parts, p, align):
    # part p of n items, its ends on multiples of align (the last part ends at n)
    lo = (n * p // parts) // align * align
    hi = n if p == parts - 1 else (n * (p + 1) // parts) // align * align
    return lo, hi


@njit(inline="always")
def sigm(x):
    # logistic through tanh: stable for any finite x (no exp overflow)
    return 0.5 * (1.0 + math.tanh(0.5 * x))


@intrinsic
def f32_from_bits(typingctx, bits):
    # reinterpret an int32 as the float32 with those bits (LLVM bitcast: vectorises)
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def bits_from_f32(typingctx, x):
    # the int32 with a float32's bits
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def wide_vectors(typingctx):
    # Marks the calling kernel "prefer-vector-width"="512". LLVM's tuning for the
    # AVX-512 Xeons stops its vectoriser at 256 bits; the arithmetic-heavy float32
    # kernels (exp32 per element) run 1.2x to 1.5x faster in 512-bit registers
    # (measured on an Emerald Rapids VM: LSTM step forward at n=128 460 -> 310 us,
    # softmax of 1580 x 1004 1.6 -> 1.3 ms), the memory-bound ones (the backward
    # steps, Adam) as fast or slower, so only the former ask. Where the CPU has no
    # 512-bit vectors the attribute changes nothing. llvmlite's attribute set takes
    # no key=value attributes, hence the set.add around its check.
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


# exp32(x) = 2^n e^r, n = rint(x log2 e), r = x - n ln 2 in two parts (n * LN2_HI is
# exact: LN2_HI has 9 trailing zero bits, n at most 8 significant ones), e^r by
# EXP_POLY on |r| <= ln2/2. For x in [-87, 88] (callers clamp): at most 1.088 ulp
# from exp(x) over all 2.24 billion float32 in that range with FMA, 1.35 without
# (tests/test_kernels.py samples them). contract lets LLVM fuse the polynomial's
# multiply-adds into FMAs: only this function's own rounding, nothing around it,
# changes.
_LOG2E32, _LN2_HI32, _LN2_LO32 = np.float32(LOG2E), np.float32(LN2_HI), np.float32(LN2_LO)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (np.float32(c) for c in EXP_POLY)
# The float32 gates: sigmoid(z) = 1 / (1 + e^-z), tanh(z) = 2 / (1 + e^-2z) - 1, the
# exponent clamped to [-80, 80] (no overflow; both saturate to the last bit well
# before).
_ONE32, _TWO32, _LIM32 = np.float32(1.0), np.float32(2.0), np.float32(80.0)


@njit(fastmath={"contract"}, error_model="numpy")
def exp32(x):
    n = np.float32(np.rint(x * _LOG2E32))
    r = (x - n * _LN2_HI32) - n * _LN2_LO32
    p = ((((((_C6 * r + _C5) * r + _C4) * r + _C3) * r + _C2) * r + _C1) * r) + _C0
    return p * f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def sigmoid32(z):
    return _ONE32 / (_ONE32 + exp32(min(max(-z, -_LIM32), _LIM32)))


@njit(inline="always")
def tanh32(z):
    return _TWO32 / (_ONE32 + exp32(min(max(-_TWO32 * z, -_LIM32), _LIM32))) - _ONE32


@njit(**OPTS)
def exp32_into(x, out):
    wide_vectors()
    for k in range(x.size):
        out[k] = exp32(x[k])


@njit(fastmath={"reassoc"}, error_model="numpy")
def row_sum64(x):
    # float64 sum of a float32 row; reassoc lets LLVM vectorise it (partial sums in
    # lanes, in an order fixed by the compiled code: the same on every rank of a
    # machine type, and within 1e-15 of any other order here)
    total = 0.0
    for j in range(x.size):
        total += x[j]
    return total
