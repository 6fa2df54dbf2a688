"""Adam over the flat parameter buffer, in one pass (and split across the pool's threads).

The arithmetic stays in the buffer's dtype; every element is updated by the same code
whichever part it falls in: the same bits serial or split.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..bf16 import round_value
from .jit import OPTS, SPLIT_OPTS, bounds

# adam_bf16 updates and rounds this many elements at a time (in L1 between the two)
ROUND_BLOCK = 2048


# Adam is memory-bound: keep its arithmetic in the buffer's dtype (no float64
# promotion); with error_model="numpy" LLVM vectorises the sqrt and division
# (IEEE, no fastmath: the same bits as the scalar loop). Both halves of the buffers
# advance in one loop: 14 memory streams instead of 7 keep more of memory busy
# (3.3 -> 2.9 ms at 2.6M parameters, bitwise the same).
@njit(inline="always")
def adam_one(p, g, m, v, k, step, inv_b2, c1, c1m, c2, c2m, e):
    gk = g[k]
    mk = c1 * m[k] + c1m * gk
    vk = c2 * v[k] + c2m * gk * gk
    m[k] = mk
    v[k] = vk
    p[k] -= step * mk / (np.sqrt(vk * inv_b2) + e)


@njit(**OPTS)
def adam(p, g, m, v, lr, b1, b2, eps, bias1, bias2):
    dt = p.dtype.type
    step = dt(lr / bias1)
    inv_b2 = dt(1.0 / bias2)
    c1, c1m = dt(b1), dt(1.0 - b1)
    c2, c2m = dt(b2), dt(1.0 - b2)
    e = dt(eps)
    h = p.size // 2
    pa, ga, ma, va = p[:h], g[:h], m[:h], v[:h]
    pb, gb, mb, vb = p[h : 2 * h], g[h : 2 * h], m[h : 2 * h], v[h : 2 * h]
    for k in range(h):
        adam_one(pa, ga, ma, va, k, step, inv_b2, c1, c1m, c2, c2m, e)
        adam_one(pb, gb, mb, vb, k, step, inv_b2, c1, c1m, c2, c2m, e)
    for k in range(2 * h, p.size):
        adam_one(p, g, m, v, k, step, inv_b2, c1, c1m, c2, c2m, e)


@njit(**SPLIT_OPTS)
def adam_split(parts, p, g, m, v, lr, b1, b2, eps, bias1, bias2):
    n = p.size
    for q in prange(parts):
        lo, hi = bounds(n, parts, q, 16)
        adam(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], lr, b1, b2, eps, bias1, bias2)


@njit(**OPTS)
def adam_bf16(p, g, m, v, lr, b1, b2, eps, bias1, bias2, bits):
    # adam, block by block, each block of updated parameters rounded to bf16 into bits while
    # in L1 (--precision bf16: the next step's GEMMs read the weights from there). Each
    # element's update is the same arithmetic however the buffer is cut: the same bits.
    n = p.size
    for lo in range(0, n, ROUND_BLOCK):
        hi = min(lo + ROUND_BLOCK, n)
        adam(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], lr, b1, b2, eps, bias1, bias2)
        for k in range(lo, hi):
            bits[k] = round_value(p[k])


@njit(**SPLIT_OPTS)
def adam_bf16_split(parts, p, g, m, v, lr, b1, b2, eps, bias1, bias2, bits):
    n = p.size
    for q in prange(parts):
        lo, hi = bounds(n, parts, q, 16)
        adam_bf16(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], lr, b1, b2, eps, bias1, bias2,
                  bits[lo:hi])
