"""The bf16 Gemm of the CPU step (``--precision bf16``): bf16 operands, float32 products and sums.

Plugged into the seam (``dtrain/kernels/gemm.py``) as ``CpuKernels(float32, gemm=Bf16Gemm())``.
Every GEMM of the step rounds its two float32 operands to bf16 (round to nearest even,
``bf16.round_value``) and calls MKL's ``cblas_gemm_bf16bf16f32`` (``dtrain/kernels/bf16.py``),
whose products are exact in float32 and whose sums and result are float32. Everything else
stays float32: the master weights, Adam, the gate arithmetic, softmax and loss, the reductions
and the checkpoints (the operands' bf16 copies live only here).

Invariants:
- ``op(bits)`` of an operand holds exactly the bf16 rounding of the float32 operand, whatever
  its layout: a transposed view (``W.T``, ``x.T``) is rounded from its C-ordered base and
  given to MKL with the transpose flag, never copied into another layout first.
- The arrays named to ``operands_fixed`` (the weights, for a whole pass; dscores and the gate
  gradient for the GEMMs that share them) are rounded once on entry (one pass over Wh per
  training pass, not one per time step) and looked up by address, shape and strides while the
  block is open; the copies are forgotten on exit, so an array changed afterwards (Adam, a
  finite-difference probe, a reused workspace buffer) is rounded again, never read stale.
- Activations are rounded into buffers this object owns and reuses (grown when a pass needs
  more, never shrunk): no allocation per GEMM once the largest batch has run.
- Twins (``twin``): a float32 buffer whose producing kernel writes its bf16 rounding as well
  (``rounding.py``: the hidden states, the gate gradients, dscores, the gathered rows) is
  registered with its twin; a GEMM operand lying in that buffer (a row block, a transposed
  view) reads the twin at the same offset and strides and rounds nothing. The producer
  writes every twin row with the float32 row, before any GEMM reads it, and nothing else
  writes the buffer while it is registered; registrations end with the ``operands_fixed``
  block they were made in (a pass), never outliving the data. ``verify_twins`` (tests)
  checks every twin read against a fresh rounding.
- An output element's bits do not depend on how many rows or columns its GEMM has, so not on
  the rank count, the packed step's size or the thread count. MKL gives a row (column) of a
  GEMM of 2 or more rows (columns) the same bits whatever their number, but computes a
  one-row or one-column output another way (gemv: other bits; tests/test_precision.py
  shows both); such an output is computed here as two equal rows (columns). A GEMM's rows
  may be split across the shared pool's threads (``gemm_rows``), in blocks of 2 rows or
  more, for the same reason.
- ``alpha`` is 1 always; ``beta`` is 0 (``matmul``, ``transposed``) or 1 (``accumulate``, one
  GEMM adding into its output: ``accumulates``). The compiled LSTM loops call OpenBLAS's
  sgemm, not this, so ``compiled_sgemm`` is False and the recurrence runs the Python loop
  over the fused steps, whose GEMMs come here.
"""

from __future__ import annotations

import contextlib

import numpy as np
from numba import njit, prange

from .. import bf16
from ..bf16 import gemm_arrays, gemm_rows, round_value
from ..gemm import Gemm
from . import dispatch
from .jit import OPTS, SPLIT_OPTS, bounds
from .rounding import round_rows, round_rows_split

# False: no twins (every operand rounded by the GEMM that reads it), the unfused reference
# the fused step is compared with (tests/test_bf16_fused.py). verify_twins: every twin read
# is checked against a fresh rounding of its float32 operand (tests only: slow).
fusing = True
verify_twins = False

# A buffer that must grow grows by this factor beyond the request, so that the packed
# batches' varying token counts settle after a few steps instead of growing at every one.
GROWTH = 1.25


@njit(**SPLIT_OPTS)
def gemm_split(parts, fn, a, b, out, trans_a, trans_b, alpha, beta):
    """``gemm_arrays`` with out's rows in ``parts`` blocks, one per thread of the pool."""
    for p in prange(parts):
        lo, hi = bounds(out.shape[0], parts, p, 1)
        gemm_rows(fn, a, b, out, trans_a, trans_b, alpha, beta, lo, hi)


@njit(**OPTS)
def twin_agrees(src, bits, stride):
    """True when every stride-th element of bits is the bf16 rounding of src's (1-D)."""
    for i in range(0, src.size, stride):
        if bits[i] != round_value(src[i]):
            return False
    return True


def _key(x):
    """What identifies an operand's memory and layout (a weight, or a transposed view of one)."""
    return x.ctypes.data, x.shape, x.strides


def _rows_form(x):
    """(src, trans): ``src`` float32 with unit column stride whose rows are x's rows
    (trans False) or x's columns (trans True, x a transposed view of src)."""
    item = x.itemsize
    if x.shape[1] <= 1 or x.strides[1] == item:
        return x, False
    if x.shape[0] <= 1 or x.strides[0] == item:
        return x.T, True
    return np.ascontiguousarray(x), False  # no layout of the step's GEMMs comes here


class Bf16Gemm(Gemm):
    """The step's GEMMs with bf16 operands and float32 accumulation (MKL, AMX)."""

    accumulates = True
    compiled_sgemm = False
    precision = "bf16"

    def __init__(self):
        mkl = bf16.library()
        self._fn = mkl.gemm_address
        self.library = mkl.describe()
        self._weights = {}  # _key(array or array.T) -> (bits, trans) while operands_fixed
        self._depth = 0  # operands_fixed blocks open
        self._stores = {}  # slot -> flat buffer, reused (uint16 bits; float32 for _two_wide)
        self._twins = {}  # slot -> (address, bytes, flat bits, depth) while registered

    def _store(self, slot, shape, dtype=np.uint16):
        size = int(np.prod(shape))
        buf = self._stores.get(slot)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = np.empty(max(int(size * GROWTH), 1), dtype)
            self._stores[slot] = buf
        return buf[:size].reshape(shape)

    def _two_wide(self, a, b, out, beta):
        """out = a @ b + beta out for an out of one row or one column, computed with that row
        (column) twice: MKL's path for 2 or more, whose bits the row has in any larger GEMM."""
        m, n = out.shape
        if m == 1:
            a = self._repeat(a, "a2")  # (2, k)
        if n == 1:
            b = self._repeat(b.T, "b2").T  # (k, 2)
        wide = self._store("out2", (max(m, 2), max(n, 2)), np.float32)
        if beta:
            wide[...] = out  # a row (column) broadcast to two
        self._product(a, b, wide, beta)
        out[...] = wide[:m, :n]
        return out

    def _repeat(self, row, slot):
        """A float32 (2, k) buffer holding ``row`` (1, k) twice."""
        two = self._store(slot, (2, row.shape[1]), np.float32)
        two[...] = row
        return two

    def _round(self, x, slot):
        """(bits, trans) with op(bits) = x rounded to bf16 (``operands_fixed``'s copy if x is
        one of its arrays or a transposed view of one; a twin's part if x lies in a twin's
        buffer)."""
        hit = self._weights.get(_key(x))
        if hit is not None:
            return hit
        if self._twins:
            view = self._twin_view(x)
            if view is not None:
                return _rows_form(view)
        src, trans = _rows_form(x)
        bits = self._store(slot, src.shape)
        self.round_into(src, bits)
        return bits, trans

    def round_into(self, src, bits):
        """bits = src rounded to bf16 (src float32 2-D, unit column stride; bits uint16)."""
        dispatch.run(src.size, round_rows, round_rows_split, src, bits,
                     serial_tail=(0, src.shape[0]))
        return bits

    def twin(self, x, slot):
        """A uint16 buffer of x's shape that x's producing kernel fills with x's bf16
        rounding, registered until the innermost open ``operands_fixed`` block ends: GEMMs
        reading x, or a part or transposed view of it, read it instead of rounding x. None
        outside such a block, or for an x that is not a C-contiguous float32 array."""
        if (self._depth == 0 or not fusing or not isinstance(x, np.ndarray)
                or x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous):
            return None
        bits = self._store(("twin", slot), x.shape)
        self._twins[slot] = (x.ctypes.data, x.nbytes, bits.reshape(-1), self._depth)
        return bits

    def _twin_view(self, x):
        """The bits of x from the twin whose buffer holds it, or None."""
        address = x.ctypes.data
        for slot, (start, size, flat, _) in self._twins.items():
            if start <= address < start + size:
                rows, cols = x.strides
                if rows % 4 or cols % 4:
                    return None
                view = np.ndarray(x.shape, np.uint16, flat, (address - start) // 2,
                                  (rows // 2, cols // 2))
                if verify_twins:
                    expected = np.empty(x.shape, np.uint16)
                    for i in range(x.shape[0]):
                        bf16.round_row(x[i], expected[i])
                    if not np.array_equal(view, expected):
                        raise AssertionError(f"Bf16Gemm: the twin {slot!r} is stale for an "
                                             f"operand {x.shape} at offset {address - start}")
                return view
        return None

    def param_twin(self, buffer):
        """uint16 of the flat float32 parameters' size: Adam writes their rounding there."""
        if not (isinstance(buffer, np.ndarray) and buffer.dtype == np.float32
                and buffer.ndim == 1 and buffer.flags.c_contiguous) or not fusing:
            return None
        return self._store("params", buffer.shape)

    def _check_converted(self, buffer, bits):
        """A cheap guard against a parameter twin gone stale (the parameters written by
        something other than the optimizer since): about 64 spread elements compared."""
        if not twin_agrees(buffer, bits, max(1, buffer.size // 64)):
            raise RuntimeError("Bf16Gemm: the parameters changed since the optimizer rounded "
                               "them (their bf16 copy is stale)")

    @contextlib.contextmanager
    def operands_fixed(self, *arrays, converted=None):
        """While open, ``arrays`` (float32, unchanged inside) are rounded once here and every
        GEMM that reads one of them, or its transpose, reads that copy. Blocks nest: an inner
        block adds its arrays, and its exit forgets only those. ``converted`` = (buffer, bits):
        bits is buffer's rounding, written by Adam (``param_twin``); arrays lying in buffer
        are read from there (a twin for the block) and not rounded."""
        outer, depth = self._weights, self._depth
        if converted is not None and fusing:
            buffer, bits = converted
            self._check_converted(buffer, bits)
            self._twins["params"] = (buffer.ctypes.data, buffer.nbytes, bits, depth + 1)
        fixed = dict(outer)
        for i, x in enumerate(arrays):
            bits, trans = self._round(x, ("fixed", depth, i))
            fixed[_key(x)] = (bits, trans)
            fixed[_key(x.T)] = (bits, not trans)
        self._weights, self._depth = fixed, depth + 1
        try:
            yield
        finally:
            self._weights, self._depth = outer, depth
            if self._twins:  # registered inside the block: they end with it
                self._twins = {k: v for k, v in self._twins.items() if v[3] <= depth}

    def _product(self, a, b, out, beta):
        """out = a @ b + beta out, a and b float32 rounded to bf16, out float32."""
        if not all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in (a, b, out)):
            raise TypeError("Bf16Gemm: expected float32 NumPy operands (--precision bf16 "
                            "needs --dtype float32 on the CPU)")
        if a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]):
            raise ValueError(f"Bf16Gemm: {a.shape} @ {b.shape} does not give {out.shape}")
        if out.size == 0:
            return out
        if a.shape[1] == 0:
            if beta == 0:
                out.fill(0)
            return out
        if min(out.shape) == 1:
            return self._two_wide(a, b, out, beta)
        target = out if out.shape[1] <= 1 or out.strides[1] == out.itemsize else None
        if target is None:  # no output of the step has such strides: correct, not fast
            target = np.array(out, order="C") if beta else np.empty(out.shape, np.float32)
        (a_bits, trans_a), (b_bits, trans_b) = self._round(a, "a"), self._round(b, "b")
        # blocks of at least 2 rows (a one-row block would take MKL's gemv path)
        parts = min(dispatch.parts_for(target.size), target.shape[0] // 2)
        args = (self._fn, a_bits, b_bits, target, trans_a, trans_b, 1.0, float(beta))
        if parts > 1:
            gemm_split(parts, *args)
        else:
            gemm_arrays(*args)
        if target is not out:
            out[...] = target
        return out

    def _matmul(self, a, b, out):
        return self._product(a, b, out, 0.0)

    def _accumulate(self, a, b, out):
        return self._product(a, b, out, 1.0)

    def _transposed(self, a, b, out):
        return self._product(a, b.T, out, 0.0)
