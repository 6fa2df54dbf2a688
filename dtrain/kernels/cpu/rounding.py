"""The bf16 forms of the kernels that produce a GEMM operand (``--precision bf16``).

Each writes its float32 result exactly as its plain kernel does (it calls that kernel,
unchanged, on one row or one aligned block of rows) and then, while those rows are still
in L1 or L2, their bf16 rounding into the operand's twin (``Bf16Gemm.twin``,
``gemm_bf16.py``): the GEMMs that read the operand read the twin and round nothing. Which
arrays: the LSTM's hidden states and their stacked prev_h copy (the step's forward kernel),
the gate gradients (its backward kernel), the RNN's and the GRU's hidden states and
pre-activation gradients (their step kernels), dscores (the softmax), the embedded words and
the scored rows (the row gather).

Invariants:
- A twin row is ``round_value`` of its float32 row as the plain kernel left it: the float32
  results are the plain kernels' bits (fastmath is off, and a row's arithmetic does not
  depend on how many rows a call has), so fused and unfused steps agree bitwise
  (tests/test_bf16_fused.py).
- The split forms cut rows exactly as the plain split forms do (the softmax on blocks of
  PARTIAL_ROWS, for its bias-gradient partial sums).
"""

from __future__ import annotations

from numba import njit, prange

from ..bf16 import round_row
from .cells import gru_bwd, gru_fwd32, lstm_bwd_in_place, lstm_fwd32_acc, rnn_bwd, rnn_fwd32
from .jit import OPTS, PARTIAL_ROWS, SPLIT_OPTS, bounds, wide_vectors
from .rows import gather_rows
from .softmax import softmax_xent32


@njit(**OPTS)
def round_rows(src, dst, lo, hi):
    """dst[i] = bf16 bits of src[i] for rows lo..hi: src float32 2-D with unit column stride
    (row views allowed), dst uint16 of the same shape."""
    for i in range(lo, hi):
        round_row(src[i], dst[i])


@njit(**SPLIT_OPTS)
def round_rows_split(parts, src, dst):
    for p in prange(parts):
        lo, hi = bounds(src.shape[0], parts, p, 1)
        round_rows(src, dst, lo, hi)


@njit(**OPTS)
def lstm_fwd32_acc_bf16(a, b, prev_c, c, tc, h, h_next, n_next, h_bits, hn_bits):
    # lstm_fwd32_acc row by row; each h row, while in L1, rounded into h_bits and (rows
    # below n_next) hn_bits, the twin of the next step's prev_h block
    wide_vectors()
    for row in range(a.shape[0]):
        k = 1 if row < n_next else 0
        lstm_fwd32_acc(a[row : row + 1], b, prev_c[row : row + 1], c[row : row + 1],
                       tc[row : row + 1], h[row : row + 1], h_next[row : row + k], k)
        hb = h_bits[row]
        round_row(h[row], hb)
        if k:
            hn_bits[row, :] = hb


@njit(**SPLIT_OPTS)
def lstm_fwd32_acc_bf16_split(parts, a, b, prev_c, c, tc, h, h_next, n_next, h_bits, hn_bits):
    for p in prange(parts):
        wide_vectors()
        lo, hi = bounds(a.shape[0], parts, p, 1)
        k = min(max(n_next - lo, 0), hi - lo)
        lstm_fwd32_acc_bf16(a[lo:hi], b, prev_c[lo:hi], c[lo:hi], tc[lo:hi], h[lo:hi],
                            h_next[lo : lo + k], k, h_bits[lo:hi], hn_bits[lo : lo + k])


@njit(**OPTS)
def lstm_bwd_bf16(a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, d_bits):
    # lstm_bwd_in_place row by row; each row of gate gradients, while in L1, rounded into
    # d_bits (the recurrent GEMM of this step and the weight gradients read it)
    for row in range(a.shape[0]):
        k = 1 if row < n_next else 0
        lstm_bwd_in_place(a[row : row + 1], dh_up[row : row + 1], dh_rec[row : row + 1],
                          dc_rec[row : row + 1], k, prev_c[row : row + 1], tc[row : row + 1])
        round_row(a[row], d_bits[row])


@njit(**SPLIT_OPTS)
def lstm_bwd_bf16_split(parts, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc, d_bits):
    for p in prange(parts):
        lo, hi = bounds(a.shape[0], parts, p, 1)
        k = min(max(n_next - lo, 0), hi - lo)
        lstm_bwd_bf16(a[lo:hi], dh_up[lo:hi], dh_rec[lo:hi], dc_rec[lo:hi], k, prev_c[lo:hi],
                      tc[lo:hi], d_bits[lo:hi])


@njit(**OPTS)
def softmax_xent32_bf16(scores, b, targets, inv_norm, row_loss, partials, bits):
    # softmax_xent32 on blocks of PARTIAL_ROWS rows (each block its own partial sums, as
    # in the whole call); each block's gradient rows, while in L2, rounded into bits.
    # scores' first row starts a block (the split form cuts on multiples of PARTIAL_ROWS).
    M, B = scores.shape[0], PARTIAL_ROWS
    for lo in range(0, M, B):
        hi = min(lo + B, M)
        softmax_xent32(scores[lo:hi], b, targets[lo:hi], inv_norm, row_loss[lo:hi],
                       partials[lo // B : lo // B + 1])
        for i in range(lo, hi):
            round_row(scores[i], bits[i])


@njit(**SPLIT_OPTS)
def softmax_xent32_bf16_split(parts, scores, b, targets, inv_norm, row_loss, partials, bits):
    M, B = scores.shape[0], PARTIAL_ROWS
    for p in prange(parts):
        wide_vectors()
        lo, hi = bounds(M, parts, p, B)
        softmax_xent32_bf16(scores[lo:hi], b, targets[lo:hi], inv_norm, row_loss[lo:hi],
                            partials[lo // B : (hi + B - 1) // B], bits[lo:hi])


@njit(**OPTS)
def gather_rows_bf16(src, idx, out, bits, lo, hi):
    # gather_rows row by row, each gathered row rounded into bits; returns how many
    # indices were out of range (their rows, and their bits, left as they were)
    bad = 0
    for i in range(lo, hi):
        miss = gather_rows(src, idx, out, i, i + 1)
        bad += miss
        if miss == 0:
            round_row(out[i], bits[i])
    return bad


@njit(**SPLIT_OPTS)
def gather_rows_bf16_split(parts, src, idx, out, bits):
    bad = 0
    for p in prange(parts):
        lo, hi = bounds(out.shape[0], parts, p, 1)
        bad += gather_rows_bf16(src, idx, out, bits, lo, hi)
    return bad


@njit(**OPTS)
def rnn_fwd32_bf16(a, r, h_bits):
    # rnn_fwd32 row by row (a becomes h), each h row rounded into h_bits
    for row in range(a.shape[0]):
        rnn_fwd32(a[row : row + 1], r[row : row + 1])
        round_row(a[row], h_bits[row])


@njit(**OPTS)
def rnn_bwd_bf16(d, dh_up, dh_rec, n_next, h, d_bits):
    # rnn_bwd row by row, each row of pre-activation gradients rounded into d_bits
    for row in range(h.shape[0]):
        k = 1 if row < n_next else 0
        rnn_bwd(d[row : row + 1], dh_up[row : row + 1], dh_rec[row : row + 1], k,
                h[row : row + 1])
        round_row(d[row], d_bits[row])


@njit(**OPTS)
def gru_fwd32_bf16(a, r, prev_h, hn, h, h_bits):
    # gru_fwd32 row by row, each h row rounded into h_bits
    for row in range(a.shape[0]):
        gru_fwd32(a[row : row + 1], r[row : row + 1], prev_h[row : row + 1], hn[row : row + 1],
                  h[row : row + 1])
        round_row(h[row], h_bits[row])


@njit(**OPTS)
def gru_bwd_bf16(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, ph, dax_bits, dah_bits):
    # gru_bwd row by row, each row of both pre-activation gradients rounded into its bits
    for row in range(a.shape[0]):
        k = 1 if row < n_next else 0
        gru_bwd(dax[row : row + 1], dah[row : row + 1], dh_up[row : row + 1],
                dh_rec[row : row + 1], carry[row : row + 1], k, a[row : row + 1],
                hn[row : row + 1], ph[row : row + 1])
        round_row(dax[row], dax_bits[row])
        round_row(dah[row], dah_bits[row])
