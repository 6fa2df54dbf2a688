"""The LSTM's recurrent time loops, compiled whole (float32, OpenBLAS found).

Per time step the recurrent GEMM through its address (``blas.py``) and the cell's step
kernel (``cells.py``), with no Python between steps: the same calls in the same order
as the Python loop of ``kernels/base.py``, so the same bits. The ``_split`` forms run each
step's gate kernel on the shared pool's threads (each its own rows) when the step has
at least ``min_elements`` gate entries.

``log`` (int64, one row per recurrent GEMM, LOG_FIELDS columns, or no rows): while a
GEMM recorder listens (``gemm.py``) each GEMM writes its kind, the time-stamp ticks it
took and its operands' layouts there; with no rows nothing is timed or written.
"""

from __future__ import annotations

from types import SimpleNamespace

from numba import prange

from .blas import read_ticks
from .cells import lstm_bwd_in_place, lstm_bwd_part, lstm_fwd32_acc, lstm_fwd_part
from .jit import bounds, stable
from .rounding import lstm_bwd_bf16

# log columns: kind, ticks, then (data address, rows, columns, row stride, column stride
# in bytes) of a, b and out
LOG_FIELDS = 17
ACCUMULATE, TRANSPOSED = 0, 1  # out += a @ b; out = a @ b.T


@stable("gemm_log_layout.v1", inline="always")
def _layout(log, i, col, x):
    log[i, col] = x.ctypes.data
    log[i, col + 1] = x.shape[0]
    log[i, col + 2] = x.shape[1]
    log[i, col + 3] = x.strides[0]
    log[i, col + 4] = x.strides[1]


@stable("note_gemm.v1", inline="always")
def note_gemm(log, i, kind, ticks, a, b, out):
    # row i of the log: one recurrent GEMM as it was called
    log[i, 0] = kind
    log[i, 1] = ticks
    _layout(log, i, 2, a)
    _layout(log, i, 7, b)
    _layout(log, i, 12, out)


@stable("step_rows.v1", inline="always")
def step_rows(t, sizes, offsets, C, c0):
    # step t's rows (n from s), how many continue into step t+1, and c_{t-1}
    n, s = sizes[t], offsets[t]
    n_next = sizes[t + 1] if t + 1 < sizes.size else 0
    prev_c = c0[:n] if t == 0 else C[offsets[t - 1] : offsets[t - 1] + n]
    return n, s, n_next, prev_c


def build(ffi):
    """The loops for the FFI ``ffi`` (``blas.ffi()``), compiled on first use."""
    return SimpleNamespace(**_backward_steps(ffi), **_forward_loops(ffi), **_backward_loops(ffi))


def _backward_steps(ffi):
    """One LSTM backward step that first copies its dh_rec rows from the transposed result."""
    width, rows_from_T = ffi.width, ffi.rows_from_T

    @stable(f"lstm_bwd_T.{width}", cache=True, nogil=True, error_model="numpy")
    def lstm_bwd_T(fn, src_T, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
        # one backward step that first copies its dh_rec rows from the previous recurrent
        # GEMM's transposed result
        rows_from_T(fn, src_T, dh_rec, 0, n_next)
        lstm_bwd_in_place(a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)

    @stable(f"lstm_bwd_T_split.{width}", cache=True, nogil=True, error_model="numpy", parallel=True)
    def lstm_bwd_T_split(parts, fn, src_T, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
        # each thread copies its own rows, then reads them from its cache
        n = a.shape[0]
        for p in prange(parts):
            lo, hi = bounds(n, parts, p, 1)
            rows_from_T(fn, src_T, dh_rec, lo, min(hi, n_next))
            lstm_bwd_part(p, parts, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)

    @stable(f"lstm_bwd_T_bf16.{width}", cache=True, nogil=True, error_model="numpy")
    def lstm_bwd_T_bf16(fn, src_T, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, d_bits):
        # lstm_bwd_T whose gate gradients are also rounded into d_bits (rounding.py)
        rows_from_T(fn, src_T, dh_rec, 0, n_next)
        lstm_bwd_bf16(a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, d_bits)

    @stable(f"lstm_bwd_T_bf16_split.{width}", cache=True, nogil=True, error_model="numpy",
            parallel=True)
    def lstm_bwd_T_bf16_split(parts, fn, src_T, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc,
                              d_bits):
        n = a.shape[0]
        for p in prange(parts):
            lo, hi = bounds(n, parts, p, 1)
            rows_from_T(fn, src_T, dh_rec, lo, min(hi, n_next))
            k = min(max(n_next - lo, 0), hi - lo)
            lstm_bwd_bf16(a[lo:hi], dh_up[lo:hi], dh_rec[lo:hi], dc_rec[lo:hi], k,
                          prev_c[lo:hi], tc[lo:hi], d_bits[lo:hi])

    return {"lstm_bwd_T": lstm_bwd_T, "lstm_bwd_T_split": lstm_bwd_T_split,
            "lstm_bwd_T_bf16": lstm_bwd_T_bf16, "lstm_bwd_T_bf16_split": lstm_bwd_T_bf16_split}


def _forward_loops(ffi):
    """The forward time loop, serial and split: per step the recurrent GEMM adding h_{t-1} Wh
    to the gate rows, then the gate kernel."""
    width, gemm_acc = ffi.width, ffi.gemm_acc

    @stable(f"forward_gemm.{width}.v2", inline="always")
    def forward_gemm(fn, t, gates, C, PH, h0, c0, Wh, sizes, offsets, log):
        # step t's recurrent GEMM: h_{t-1} Wh added to its gate rows; returns those rows
        # and c_{t-1}
        n, s = sizes[t], offsets[t]
        if t == 0:
            prev_h, prev_c = h0[:n], c0[:n]
        else:
            prev_h, prev_c = PH[s : s + n], C[offsets[t - 1] : offsets[t - 1] + n]
        a = gates[s : s + n]
        if log.shape[0] > 0:
            t0 = read_ticks()
            gemm_acc(fn, prev_h, Wh, a)
            note_gemm(log, t, ACCUMULATE, read_ticks() - t0, prev_h, Wh, a)
        else:
            gemm_acc(fn, prev_h, Wh, a)
        return a, prev_c

    @stable(f"lstm_forward_loop.{width}", cache=True, nogil=True, error_model="numpy")
    def lstm_forward_loop(fn, gates, C, TC, Hp, PH, h0, c0, Wh, b, sizes, offsets, log):
        T = sizes.size
        for t in range(T):
            n, s = sizes[t], offsets[t]
            n_next = sizes[t + 1] if t + 1 < T else 0
            a, prev_c = forward_gemm(fn, t, gates, C, PH, h0, c0, Wh, sizes, offsets, log)
            lstm_fwd32_acc(a, b, prev_c, C[s : s + n], TC[s : s + n], Hp[s : s + n],
                           PH[s + n : s + n + n_next], n_next)

    @stable(f"lstm_forward_loop_split.{width}", cache=True, nogil=True, error_model="numpy",
            parallel=True)
    def lstm_forward_loop_split(parts, min_elements, fn, gates, C, TC, Hp, PH, h0, c0, Wh, b,
                                sizes, offsets, log):
        T = sizes.size
        for t in range(T):
            n, s = sizes[t], offsets[t]
            n_next = sizes[t + 1] if t + 1 < T else 0
            a, prev_c = forward_gemm(fn, t, gates, C, PH, h0, c0, Wh, sizes, offsets, log)
            c, tc, h = C[s : s + n], TC[s : s + n], Hp[s : s + n]
            hn = PH[s + n : s + n + n_next]
            if a.size < min_elements:
                lstm_fwd32_acc(a, b, prev_c, c, tc, h, hn, n_next)
            else:
                for p in prange(parts):
                    lstm_fwd_part(p, parts, a, b, prev_c, c, tc, h, hn, n_next)

    return {"lstm_forward_loop": lstm_forward_loop,
            "lstm_forward_loop_split": lstm_forward_loop_split}


def _backward_loops(ffi):
    """The backward time loop, serial and split: per time step (last first) the step's dh_rec
    rows copied from the previous recurrent GEMM's transposed result, the gate kernel (gate
    gradients in place over the gates), then the recurrent GEMM: (Wh d^T) into scratch for
    at most max_T_rows rows (left transposed for the next step, copied into dh0 at t = 0),
    d Wh^T straight into its rows above."""
    width, gemm_bt, rows_from_T = ffi.width, ffi.gemm_bt, ffi.rows_from_T

    @stable(f"backward_gemm.{width}.v2", inline="always")
    def backward_gemm(fn, omat, d, Wh, dh_rec, dh0, scratch, t, max_T_rows, log):
        # the recurrent GEMM of step t; True when its result waits transposed in scratch
        n, H = d.shape[0], Wh.shape[0]
        transposed = n <= max_T_rows
        out_T = scratch[: H * n if transposed else 0].reshape((H, n if transposed else 0))
        rows = (dh_rec if t > 0 else dh0)[:n]
        t0 = read_ticks() if log.shape[0] > 0 else 0
        if transposed:
            gemm_bt(fn, Wh, d, out_T)
        else:
            gemm_bt(fn, d, Wh, rows)
        if log.shape[0] > 0:
            i = log.shape[0] - 1 - t  # in call order: the last step's GEMM first
            if transposed:
                note_gemm(log, i, TRANSPOSED, read_ticks() - t0, Wh, d, out_T)
            else:
                note_gemm(log, i, TRANSPOSED, read_ticks() - t0, d, Wh, rows)
        if transposed and t == 0:
            rows_from_T(omat, out_T, dh0, 0, n)
        return transposed and t > 0

    @stable(f"lstm_backward_loop.{width}", cache=True, nogil=True, error_model="numpy")
    def lstm_backward_loop(fn, omat, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0, scratch, sizes,
                           offsets, max_T_rows, log):
        H = Wh.shape[0]
        pending = False
        for t in range(sizes.size - 1, -1, -1):
            n, s, n_next, prev_c = step_rows(t, sizes, offsets, C, c0)
            d = gates[s : s + n]
            if pending:
                rows_from_T(omat, scratch[: H * n_next].reshape((H, n_next)), dh_rec, 0, n_next)
            lstm_bwd_in_place(d, dH[s : s + n], dh_rec, dc_rec, n_next, prev_c, TC[s : s + n])
            pending = backward_gemm(fn, omat, d, Wh, dh_rec, dh0, scratch, t, max_T_rows, log)

    @stable(f"lstm_backward_loop_split.{width}", cache=True, nogil=True, error_model="numpy",
            parallel=True)
    def lstm_backward_loop_split(parts, min_elements, fn, omat, gates, dH, dh_rec, dc_rec, C, c0,
                                 TC, Wh, dh0, scratch, sizes, offsets, max_T_rows, log):
        H = Wh.shape[0]
        pending = False
        for t in range(sizes.size - 1, -1, -1):
            n, s, n_next, prev_c = step_rows(t, sizes, offsets, C, c0)
            d, dh_up, tc = gates[s : s + n], dH[s : s + n], TC[s : s + n]
            m = n_next if pending else 0  # the previous GEMM's (H, n_next) result, when it waits
            src_T = scratch[: H * m].reshape((H, m))
            if d.size < min_elements:
                if pending:
                    rows_from_T(omat, src_T, dh_rec, 0, n_next)
                lstm_bwd_in_place(d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
            else:
                for p in prange(parts):
                    if pending:
                        lo, hi = bounds(n, parts, p, 1)
                        rows_from_T(omat, src_T, dh_rec, lo, min(hi, n_next))
                    lstm_bwd_part(p, parts, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
            pending = backward_gemm(fn, omat, d, Wh, dh_rec, dh0, scratch, t, max_T_rows, log)

    return {"lstm_backward_loop": lstm_backward_loop,
            "lstm_backward_loop_split": lstm_backward_loop_split}
