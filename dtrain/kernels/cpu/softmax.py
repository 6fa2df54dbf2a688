"""The softmax cross-entropy loss and its gradient, in place over the scores.

``softmax_xent`` (float64, libm) and ``softmax_xent32`` (float32, exp32, the bias
added and its gradient's column sums taken in the same pass, per block of
PARTIAL_ROWS rows: the same bits however the rows are split across threads).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .jit import (
    OPTS,
    PARTIAL_ROWS,
    SPLIT_OPTS,
    bits_from_f32,
    bounds,
    exp32,
    f32_from_bits,
    row_sum64,
    wide_vectors,
)


@njit(**OPTS)
def softmax_xent(scores, targets, inv_norm, row_loss):
    M, V = scores.shape
    for row in range(M):
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


@njit(**OPTS)
def softmax_xent32(scores, b, targets, inv_norm, row_loss, partials):
    # Per row, while it sits in L1: the max of scores + b (b the vocabulary bias, added
    # here rather than in a pass of its own), exp of the shifted scores, their
    # float64 sum, then the gradient in place. partials (rows / PARTIAL_ROWS, V), unless
    # empty, gets the gradient's column sums of each block of PARTIAL_ROWS rows (rows
    # added in order); sum_partials adds the blocks in order: the vocabulary bias
    # gradient without a pass of its own over the scores, in an order that does not
    # depend on how the rows are split across threads. exp(x) of x < -87 would be
    # subnormal: 0 instead (it cannot move a float64 sum that holds a 1).
    # The max runs on integer keys (the float's bits, negatives' magnitude bits
    # flipped: ordered as the floats are, -0 below +0), because LLVM vectorises an
    # integer max but not a float one; a NaN becomes the max or stays in its row,
    # either way the loss is NaN.
    wide_vectors()
    M, V = scores.shape
    dt = scores.dtype.type
    floor = dt(-87.0)
    zero = dt(0.0)
    low31, sign = np.int32(0x7FFFFFFF), np.int32(31)
    with_sum = partials.shape[0] > 0
    for row in range(M):
        s = scores[row]
        key_max = np.int32(-0x80000000)
        for j in range(V):
            bits = bits_from_f32(s[j] + b[j])
            key_max = max(key_max, bits ^ ((bits >> sign) & low31))
        m = f32_from_bits(key_max ^ ((key_max >> sign) & low31))
        y = targets[row]
        shifted_y = (s[y] + b[y]) - m
        for j in range(V):
            x = (s[j] + b[j]) - m
            s[j] = zero if x < floor else exp32(x)  # a NaN stays NaN
        total = row_sum64(s)
        row_loss[row] = math.log(total) - shifted_y
        scale = dt(inv_norm / total)
        for j in range(V):
            s[j] *= scale
        s[y] -= dt(inv_norm)
        if with_sum:
            part = partials[row // PARTIAL_ROWS]
            if row % PARTIAL_ROWS == 0:
                part[:] = 0
            for j in range(V):
                part[j] += s[j]


@njit(**OPTS)
def sum_partials(partials, col_sum):
    # col_sum = the blocks' column sums added in block order
    col_sum[:] = 0
    for blk in range(partials.shape[0]):
        p = partials[blk]
        for j in range(col_sum.size):
            col_sum[j] += p[j]


@njit(**SPLIT_OPTS)
def softmax_xent32_split(parts, scores, b, targets, inv_norm, row_loss, partials):
    # each part's rows start a block of partial sums (the blocks are the serial kernel's)
    M = scores.shape[0]
    B = PARTIAL_ROWS
    for p in prange(parts):
        wide_vectors()
        lo, hi = bounds(M, parts, p, B)
        softmax_xent32(
            scores[lo:hi],
            b,
            targets[lo:hi],
            inv_norm,
            row_loss[lo:hi],
            partials[lo // B : (hi + B - 1) // B],
        )
