"""Fused CPU kernels (Numba) for the hot elementwise work of a training step.

The plain xp code of the cells (``dtrain.nn.cells``), layers and optimizer is
the reference; these kernels do the same arithmetic in one pass over memory
instead of one pass per ufunc:

* each cell's step forward and backward (LSTM gates and c/h update, the RNN
  tanh, the GRU gates and h update), named as the cells ask for them
  (``lstm_step_forward`` ...),
* the softmax cross-entropy loss and its gradient, in place over the scores,
* Adam over the flat parameter buffer.

Numba compiles them on first use and caches them on disk. Numba's exp and tanh
are scalar libm calls, which keep a loop from vectorising: in float32 the cells'
forward steps and the softmax use ``exp32``, dtrain's own vectorised exp (at
most 1.1 ulp from the correctly rounded result, against NumPy's 2.5), each in
one pass; in float64 (the exactness checks) the kernels call libm.
"""

from __future__ import annotations

import ctypes
import math
import time
from types import SimpleNamespace

import numpy as np

from .. import alloc
from . import openblas, pool

_CPU = None
_SPLIT = None
_BLAS = None  # _build_blas's namespace (addresses empty without OpenBLAS)
_TICK_HZ = None  # the time-stamp counter's rate (CpuKernels.ticks_to_seconds)
# A kernel call splits across the shared pool's threads when its largest operand has at
# least this many elements (below it, starting the threads costs more than it saves).
SPLIT_MIN_ELEMENTS = 16384
# The float32 softmax sums its gradient's columns (the vocabulary bias gradient) per block
# of this many rows, then the blocks in order: the same bits however its rows are split.
PARTIAL_ROWS = 64

# exp32's constants. EXP_POLY: degree-6 polynomial for e^r on [-ln2/2, ln2/2], fitted
# by least squares at 4,000 Chebyshev points in float64 and rounded to float32
# (tests/test_kernels.py fits it again and checks the result).
LOG2E = 1.4426950408889634
LN2_HI = 0.693145751953125  # ln 2 to 15 bits
LN2_LO = 1.428606765330187e-06  # float32(ln 2 - LN2_HI)
EXP_POLY = (1.0, 1.0, 0.5, 0.16666415333747864, 0.041666217148303986, 0.008375131525099277,
            0.0013948584673926234)


def _build_cpu():
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    # error_model="numpy": a division by zero gives inf/nan instead of raising, so LLVM
    # may vectorise loops with divisions (with "python" every division is a branch).
    # Serial kernels: Numba's OpenMP threads spin after a parallel region and fight
    # OpenBLAS's threads for the cores (measured: 7x slower steps with parallel=True).
    # The hot loops run over one row at a time through 1-D views (ar = a[row]), which
    # LLVM vectorises; 2-D indexing a[row, H + j] with a runtime H stays scalar.
    opts = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}

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
    log2e, ln2_hi, ln2_lo = np.float32(LOG2E), np.float32(LN2_HI), np.float32(LN2_LO)
    c0, c1, c2, c3, c4, c5, c6 = (np.float32(c) for c in EXP_POLY)

    @njit(fastmath={"contract"}, error_model="numpy")
    def exp32(x):
        n = np.float32(np.rint(x * log2e))
        r = (x - n * ln2_hi) - n * ln2_lo
        p = ((((((c6 * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r) + c0
        return p * f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))

    # The float32 gates: sigmoid(z) = 1 / (1 + e^-z), tanh(z) = 2 / (1 + e^-2z) - 1, the
    # exponent clamped to [-80, 80] (no overflow; both saturate to the last bit well
    # before).
    one32, two32, lim32 = np.float32(1.0), np.float32(2.0), np.float32(80.0)

    @njit(inline="always")
    def sigmoid32(z):
        return one32 / (one32 + exp32(min(max(-z, -lim32), lim32)))

    @njit(inline="always")
    def tanh32(z):
        return two32 / (one32 + exp32(min(max(-two32 * z, -lim32), lim32))) - one32

    @njit(**opts)
    def lstm_fwd(a, r, prev_c, c, tc, h):
        n, G = a.shape
        H = G // 4
        for row in range(n):
            for j in range(H):
                i = sigm(a[row, j] + r[row, j])
                f = sigm(a[row, H + j] + r[row, H + j])
                o = sigm(a[row, 2 * H + j] + r[row, 2 * H + j])
                g = math.tanh(a[row, 3 * H + j] + r[row, 3 * H + j])
                a[row, j] = i
                a[row, H + j] = f
                a[row, 2 * H + j] = o
                a[row, 3 * H + j] = g
                cc = f * prev_c[row, j] + i * g
                c[row, j] = cc
                t = math.tanh(cc)
                tc[row, j] = t
                h[row, j] = o * t

    @njit(**opts)
    def lstm_bwd_in_place(a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
        # One LSTM step back, in place: each unit's four gate gradients overwrite the four
        # gates they are computed from (all four read first), so the step's gate rows pass
        # through the cache once: no second 4H-wide buffer to read for ownership and write
        # back (n=128: 1 MB of 3.5 MB per step; 197 -> 117 us). dc_rec carries dL/dc back.
        n, G = a.shape
        H = G // 4
        dt = a.dtype.type
        one = dt(1.0)
        # rows n_next..n end their caption here: nothing carried from step t+1
        dh_rec[n_next:n] = 0
        dc_rec[n_next:n] = 0
        for row in range(n):
            ar = a[row]
            i, f, o, g = ar[:H], ar[H : 2 * H], ar[2 * H : 3 * H], ar[3 * H :]
            tcr, pcr, dhu, dhr, dcr = tc[row], prev_c[row], dh_up[row], dh_rec[row], dc_rec[row]
            for j in range(H):
                ij, fj, oj, gj = i[j], f[j], o[j], g[j]
                dh = dhu[j] + dhr[j]
                t = tcr[j]
                dc = dcr[j] + dh * oj * (one - t * t)
                i[j] = dc * gj * ij * (one - ij)
                f[j] = dc * pcr[j] * fj * (one - fj)
                o[j] = dh * t * oj * (one - oj)
                g[j] = dc * ij * (one - gj * gj)
                dcr[j] = dc * fj

    @njit(**opts)
    def rnn_fwd(a, r):
        n, H = a.shape
        for row in range(n):
            for j in range(H):
                a[row, j] = math.tanh(a[row, j] + r[row, j])

    @njit(**opts)
    def rnn_bwd(d, dh_up, dh_rec, n_next, h):
        n, H = h.shape
        for row in range(n):
            dr, dur, hr = d[row], dh_up[row], h[row]
            if row < n_next:
                drr = dh_rec[row]
                for j in range(H):
                    dr[j] = (dur[j] + drr[j]) * (1.0 - hr[j] * hr[j])
            else:
                for j in range(H):
                    dr[j] = dur[j] * (1.0 - hr[j] * hr[j])

    @njit(**opts)
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

    @njit(**opts)
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

    # float32: one pass per LSTM step and per softmax row, with exp32 (below) in place of
    # the libm calls, which do not vectorise.
    @njit(inline="always")
    def lstm_gate_row32(ar, b, pcr, cr, tcr, hr, H):
        # one row of the step from its pre-activations ar (+ b): the activated i, f, o, g
        # back into ar, and c, tanh(c) and h. Three loops, each with one kind of work: the
        # sigmoids of i, f and o (contiguous, 3H), the tanh of g, then c, tanh(c) and h.
        # The same operations per unit as one loop doing all five (the same bits), but each
        # body keeps few values live, so LLVM's vector code keeps its constants in registers
        # (one loop: 171 instructions per 16 units, a third of them reloading constants):
        # 1.25x to 1.3x faster (n=128, one core, data in cache).
        S = 3 * H
        asg, ag, bs, bg = ar[:S], ar[S:], b[:S], b[S:]
        for j in range(S):
            asg[j] = sigmoid32(asg[j] + bs[j])
        for j in range(H):
            ag[j] = tanh32(ag[j] + bg[j])
        ai, af, ao = ar[:H], ar[H:2 * H], ar[2 * H:S]
        for j in range(H):
            cc = af[j] * pcr[j] + ai[j] * ag[j]
            cr[j] = cc
            t = tanh32(cc)
            tcr[j] = t
            hr[j] = ao[j] * t

    try:  # a fixed uuid (see "Numba keys a cached kernel" below)
        lstm_gate_row32._set_uuid("dtrain.kernels.cpu.lstm_gate_row32.v2")
    except (AttributeError, AssertionError):
        pass

    @njit(**opts)
    def lstm_fwd32_acc(a, b, prev_c, c, tc, h, h_next, n_next):
        # The float32 LSTM step where a holds x Wx + h Wh (the recurrent GEMM added its
        # product to it: gemm_accumulate): the gates of (a + b); leaves the activated i, f,
        # o, g in a. Rows below n_next are also written to h_next (the next step's block of
        # prev_h, for dWh's GEMM) while they are in L1: no pass of their own over H_packed.
        wide_vectors()
        H = a.shape[1] // 4
        for row in range(a.shape[0]):
            hr = h[row]
            lstm_gate_row32(a[row], b, prev_c[row], c[row], tc[row], hr, H)
            if row < n_next:
                hn = h_next[row]
                for j in range(H):
                    hn[j] = hr[j]

    @njit(**opts)
    def lstm_fwd32(a, r, b, prev_c, c, tc, h, h_next, n_next, zero):
        # lstm_fwd32_acc with the recurrent product in r (no accumulating GEMM): each row
        # first becomes (x Wx + b) + h Wh, the plain path's order; then the gates of it
        # + zero (4H zeros, which change no bit that matters: the gates of -0 and +0 agree)
        wide_vectors()
        G = a.shape[1]
        for row in range(a.shape[0]):
            ar, rr = a[row], r[row]
            for j in range(G):
                ar[j] = (ar[j] + b[j]) + rr[j]
        lstm_fwd32_acc(a, zero, prev_c, c, tc, h, h_next, n_next)

    @njit(**opts)
    def rnn_fwd32(a, r):
        # a = tanh(a + r) in place
        wide_vectors()
        n, H = a.shape
        for row in range(n):
            ar, rr = a[row], r[row]
            for j in range(H):
                ar[j] = tanh32(ar[j] + rr[j])

    @njit(**opts)
    def gru_fwd32(a, r, prev_h, hn, h):
        # gru_fwd in float32, on sigmoid32 and tanh32
        wide_vectors()
        n, G = a.shape
        H = G // 3
        for row in range(n):
            ar, rr = a[row], r[row]
            ar_, az, an = ar[:H], ar[H : 2 * H], ar[2 * H :]
            rr_, rz, rn = rr[:H], rr[H : 2 * H], rr[2 * H :]
            hnr, hr, phr = hn[row], h[row], prev_h[row]
            for j in range(H):
                rg = sigmoid32(ar_[j] + rr_[j])
                z = sigmoid32(az[j] + rz[j])
                hv = rn[j]
                ng = tanh32(an[j] + rg * hv)
                ar_[j] = rg
                az[j] = z
                an[j] = ng
                hnr[j] = hv
                hr[j] = ng + z * (phr[j] - ng)

    @njit(**opts)
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

    # Numba keys a cached kernel by its pickled closure, and pickles a helper the kernel
    # calls (a dispatcher or an intrinsic) with a uuid drawn anew in every process:
    # without fixed ones every process would compile the kernels that call helpers
    # again (2 s) instead of loading them (tests/test_kernels.py checks).
    for helper in (sigm, adam_one, f32_from_bits, bits_from_f32, wide_vectors, exp32, sigmoid32, tanh32,
                   row_sum64):
        try:
            helper._set_uuid(f"dtrain.kernels.cpu.{helper.__name__}.v1")
        except (AttributeError, AssertionError):  # another Numba: compiled per process
            pass

    @njit(**opts)
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

    @njit(**opts)
    def sum_partials(partials, col_sum):
        # col_sum = the blocks' column sums added in block order
        col_sum[:] = 0
        for blk in range(partials.shape[0]):
            p = partials[blk]
            for j in range(col_sum.size):
                col_sum[j] += p[j]

    @njit(**opts)
    def gru_fwd(a, r, prev_h, hn, h):
        # a: x Wx + b (r, z, n blocks), r: h Wh; leaves the activated r, z, n in a
        n, G = a.shape
        H = G // 3
        dt = a.dtype.type
        half, one = dt(0.5), dt(1.0)
        for row in range(n):
            for j in range(H):
                rg = half * (one + math.tanh(half * (a[row, j] + r[row, j])))
                z = half * (one + math.tanh(half * (a[row, H + j] + r[row, H + j])))
                hv = r[row, 2 * H + j]
                ng = math.tanh(a[row, 2 * H + j] + rg * hv)
                a[row, j] = rg
                a[row, H + j] = z
                a[row, 2 * H + j] = ng
                hn[row, j] = hv
                h[row, j] = ng + z * (prev_h[row, j] - ng)

    @njit(**opts)
    def gru_bwd(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, ph):
        n, G = a.shape
        H = G // 3
        dt = a.dtype.type
        one = dt(1.0)
        for row in range(n):
            ar, xr, hr = a[row], dax[row], dah[row]
            rg, z, ng = ar[:H], ar[H : 2 * H], ar[2 * H :]
            dxr, dxz, dxn = xr[:H], xr[H : 2 * H], xr[2 * H :]
            dhr_, dhz, dhn = hr[:H], hr[H : 2 * H], hr[2 * H :]
            dur, cr, hnr, phr = dh_up[row], carry[row], hn[row], ph[row]
            if row < n_next:  # (dh_up + dh_rec) + carry, else dh_up alone
                drr = dh_rec[row]
                for j in range(H):
                    cr[j] = (dur[j] + drr[j]) + cr[j]
            else:
                for j in range(H):
                    cr[j] = dur[j]
            for j in range(H):
                dh = cr[j]
                dan = (one - z[j]) * (one - ng[j] * ng[j]) * dh
                dar = dan * ((one - rg[j]) * rg[j] * hnr[j])
                daz = (phr[j] - ng[j]) * ((one - z[j]) * z[j]) * dh
                dxr[j] = dar
                dxz[j] = daz
                dxn[j] = dan
                dhr_[j] = dar
                dhz[j] = daz
                dhn[j] = dan * rg[j]
                cr[j] = dh * z[j]

    @njit(**opts)
    def embed_group(words, counts, ids, starts, order):
        # The row-sparse embedding gradient, part one: ids = the distinct words, ascending,
        # and order = the positions grouped by word (a stable counting sort: each word's
        # positions in position order), ids[i]'s at order[starts[i]:starts[i + 1]].
        # counts (V + 1,) is scratch. Returns the number of distinct words.
        V = counts.size - 1
        counts[:] = 0
        for k in range(words.size):
            counts[words[k] + 1] += 1
        count = 0
        for w in range(V):  # counts[w] becomes the first slot of word w
            if counts[w + 1] > 0:
                ids[count] = w
                starts[count] = counts[w]
                count += 1
            counts[w + 1] += counts[w]
        starts[count] = words.size
        for k in range(words.size):
            w = words[k]
            order[counts[w]] = k
            counts[w] += 1
        return count

    @njit(**opts)
    def embed_rows(dx, order, starts, rows, partials, lo, hi):
        # Part two, for the words lo..hi (lo a multiple of PARTIAL_ROWS): rows[i] = the sum of
        # dx over ids[i]'s positions, in position order (the bits of adding them to a zeroed
        # row in that order), each row summed in L1 and written once (no pass over the rows
        # per position: 1.9x faster than adding each position to its word's row, 1,500
        # positions of 2048). partials[b], unless partials is empty, the sum of the rows of
        # block b (PARTIAL_ROWS words, in order): sum_partials makes the column sums of dx
        # from them, in an order that does not depend on how the words are split.
        wide_vectors()
        zero = rows.dtype.type(0.0)
        with_sum = partials.shape[0] > 0
        for i in range(lo, hi):
            acc = rows[i]
            src = dx[order[starts[i]]]
            for j in range(acc.size):
                acc[j] = zero + src[j]
            for q in range(starts[i] + 1, starts[i + 1]):
                src = dx[order[q]]
                for j in range(acc.size):
                    acc[j] += src[j]
            if with_sum:
                part = partials[i // PARTIAL_ROWS]
                if i % PARTIAL_ROWS == 0:
                    part[:] = 0
                for j in range(acc.size):
                    part[j] += acc[j]

    @njit(**opts)
    def count_nonfinite(bits, exponent):
        # entries whose exponent bits are all ones (inf, nan), over the integer view of a
        # float buffer; eight streams at once (an eighth each), which keeps more of memory
        # busy than fewer do (2.6M floats from memory: 1.6 ms for NumPy's sum, 1.1 ms in
        # four streams, 0.85 ms in eight; sixteen were no faster)
        q = bits.size // 8
        count = 0
        for k in range(q):
            c = 0
            for s in range(8):
                c += (bits[s * q + k] & exponent) == exponent
            count += c
        for k in range(8 * q, bits.size):
            count += (bits[k] & exponent) == exponent
        return count

    # --deterministic: fixed-point accumulation, one pass (see parallel/reducer.py)
    @njit(**opts)
    def quantize_add(acc, g, scale):
        m = 0.0
        for k in range(g.size):
            v = np.float64(g[k])
            a = abs(v)
            if a > m:
                m = a
            acc[k] += np.int64(np.rint(v * scale))
        return m

    @njit(**opts)
    def quantize_add_rows(acc, ids, rows, scale):
        m = 0.0
        n, W = rows.shape
        for i in range(n):
            r = ids[i]
            for j in range(W):
                v = np.float64(rows[i, j])
                a = abs(v)
                if a > m:
                    m = a
                acc[r, j] += np.int64(np.rint(v * scale))
        return m

    # Row copies of the step (memory-bound; the split versions below run them on every
    # thread of the shared pool).
    @njit(**opts)
    def gather_rows(src, idx, out, lo, hi):
        # out[i] = src[idx[i]] for i in lo..hi (np.take(src, idx, axis=0, out=out)); returns
        # how many indices were out of range (their rows are left as they were)
        bad = 0
        for i in range(lo, hi):
            r = idx[i]
            if r < 0 or r >= src.shape[0]:
                bad += 1
                continue
            s, o = src[r], out[i]
            for j in range(o.size):
                o[j] = s[j]
        return bad

    @njit(**opts)
    def scatter_rows(src, pos, out, lo, hi):
        # rows lo..hi of out = 0, but out[pos[k]] = src[k] (pos ascending): out.fill(0);
        # out[pos] = src in one pass
        k = np.searchsorted(pos, lo)
        zero = out.dtype.type(0.0)
        for i in range(lo, hi):
            o = out[i]
            if k < pos.size and pos[k] == i:
                s = src[k]
                for j in range(o.size):
                    o[j] = s[j]
                k += 1
            else:
                for j in range(o.size):
                    o[j] = zero

    @njit(**opts)
    def pack_captions(captions, null):
        # model.pack_captions's arrays in one pass per output: rows sorted by caption length
        # (the last real target), longest first, ties in row order (a stable counting
        # sort); words_in, targets and is_real in the packed time-major order
        N, T = captions.shape[0], captions.shape[1] - 1
        lengths = np.zeros(N, np.int64)
        count = np.zeros(T + 1, np.int64)
        num_tokens = 0
        for n in range(N):
            for t in range(T):
                if captions[n, t + 1] != null:
                    lengths[n] = t + 1
                    num_tokens += 1
            count[lengths[n]] += 1
        start = np.zeros(T + 1, np.int64)  # first sorted slot of each length, longest first
        for length in range(T - 1, -1, -1):
            start[length] = start[length + 1] + count[length + 1]
        order = np.empty(N, np.int64)
        for n in range(N):
            order[start[lengths[n]]] = n
            start[lengths[n]] += 1
        t_max = lengths[order[0]] if N else 0
        batch_sizes = np.zeros(t_max, np.int64)
        active = N - count[0]
        total = 0
        for t in range(t_max):
            batch_sizes[t] = active
            total += active
            active -= count[t + 1]
        words_in = np.empty(total, captions.dtype)
        targets = np.empty(total, captions.dtype)
        is_real = np.empty(total, np.bool_)
        p = 0
        for t in range(t_max):
            for j in range(batch_sizes[t]):
                row = order[j]
                words_in[p] = captions[row, t]
                targets[p] = captions[row, t + 1]
                is_real[p] = captions[row, t + 1] != null
                p += 1
        return order, batch_sizes, words_in, targets, is_real, num_tokens

    @njit(**opts)
    def scatter_ids(rows, ids, out, lo, hi):
        # rows lo..hi of out = 0, then out[ids[k]] = rows[k] where ids[k] is among them
        # (ids distinct: out.fill(0); out[ids] = rows); the caller checks the ids' range
        out[lo:hi] = 0
        for k in range(ids.size):
            r = ids[k]
            if r >= lo and r < hi:
                o, s = out[r], rows[k]
                for j in range(o.size):
                    o[j] = s[j]

    @njit(**opts)
    def prev_h_rows(Hp, h0, offsets, out, lo, hi):
        # rows lo..hi of [h0[:n_0]; h_0[:n_1]; h_1[:n_2]; ...] (layers.prev_h_packed): row i
        # of step t's block is row i of step t-1's block of Hp (of h0 for t = 0)
        t = np.searchsorted(offsets, lo, side="right") - 1
        for i in range(lo, hi):
            while i >= offsets[t + 1]:
                t += 1
            r = i - offsets[t]
            src = h0[r] if t == 0 else Hp[offsets[t - 1] + r]
            o = out[i]
            for j in range(o.size):
                o[j] = src[j]

    kernels = SimpleNamespace(
        lstm_fwd=lstm_fwd, lstm_bwd_in_place=lstm_bwd_in_place, rnn_fwd=rnn_fwd, rnn_bwd=rnn_bwd,
        softmax_xent=softmax_xent, adam=adam, lstm_fwd32=lstm_fwd32, lstm_fwd32_acc=lstm_fwd32_acc,
        rnn_fwd32=rnn_fwd32,
        gru_fwd32=gru_fwd32, softmax_xent32=softmax_xent32, gru_fwd=gru_fwd, gru_bwd=gru_bwd,
        quantize_add=quantize_add, quantize_add_rows=quantize_add_rows, embed_group=embed_group,
        embed_rows=embed_rows, exp32_into=exp32_into, count_nonfinite=count_nonfinite,
        gather_rows=gather_rows, scatter_rows=scatter_rows,
        scatter_ids=scatter_ids, prev_h_rows=prev_h_rows, pack_captions=pack_captions,
        sum_partials=sum_partials)
    # the split kernels (below) call these: fixed uuids, for the reason given above
    for name in ("lstm_fwd32", "lstm_fwd32_acc", "lstm_bwd_in_place", "softmax_xent32", "embed_rows", "adam",
                 "count_nonfinite", "sum_partials", "gather_rows", "scatter_rows", "scatter_ids",
                 "prev_h_rows"):
        try:
            getattr(kernels, name)._set_uuid(f"dtrain.kernels.cpu.{name}.v2")
        except (AttributeError, AssertionError):
            pass
    kernels.wide_vectors = wide_vectors
    return kernels


def _build_split(k):
    """The kernels split across the threads of the shared pool (``pool.py``), in ``parts``.

    Each part runs the serial kernel on its own rows (or columns, or elements), so
    every element is computed by the same code in the same order as on one thread:
    the same bits. Only built and used while OpenBLAS's jobs run on the same pool.
    """
    from numba import njit, prange

    opts = {"cache": True, "nogil": True, "error_model": "numpy", "parallel": True}
    wide_vectors = k.wide_vectors
    lstm_fwd32, lstm_bwd_in_place, softmax_xent32 = k.lstm_fwd32, k.lstm_bwd_in_place, k.softmax_xent32
    lstm_fwd32_acc = k.lstm_fwd32_acc
    embed_rows, adam, count_nonfinite = k.embed_rows, k.adam, k.count_nonfinite
    gather_rows, scatter_rows, prev_h_rows = k.gather_rows, k.scatter_rows, k.prev_h_rows
    scatter_ids = k.scatter_ids

    @njit(inline="always")
    def bounds(n, parts, p, align):
        # part p of n items, its ends on multiples of align (the last part ends at n)
        lo = (n * p // parts) // align * align
        hi = n if p == parts - 1 else (n * (p + 1) // parts) // align * align
        return lo, hi

    try:  # a fixed uuid (see _build_cpu)
        bounds._set_uuid("dtrain.kernels.cpu.bounds.v1")
    except (AttributeError, AssertionError):
        pass

    @njit(**opts)
    def lstm_fwd32_split(parts, a, r, b, prev_c, c, tc, h, h_next, n_next, zero):
        n = a.shape[0]
        for p in prange(parts):
            wide_vectors()
            lo, hi = bounds(n, parts, p, 1)
            k = min(max(n_next - lo, 0), hi - lo)
            lstm_fwd32(a[lo:hi], r[lo:hi], b, prev_c[lo:hi], c[lo:hi], tc[lo:hi], h[lo:hi],
                       h_next[lo : lo + k], k, zero)

    @njit(**opts)
    def lstm_fwd32_acc_split(parts, a, b, prev_c, c, tc, h, h_next, n_next):
        n = a.shape[0]
        for p in prange(parts):
            wide_vectors()
            lo, hi = bounds(n, parts, p, 1)
            k = min(max(n_next - lo, 0), hi - lo)
            lstm_fwd32_acc(a[lo:hi], b, prev_c[lo:hi], c[lo:hi], tc[lo:hi], h[lo:hi], h_next[lo : lo + k], k)

    @njit(**opts)
    def lstm_bwd_split(parts, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
        n = a.shape[0]
        for p in prange(parts):
            lo, hi = bounds(n, parts, p, 1)
            lstm_bwd_in_place(a[lo:hi], dh_up[lo:hi], dh_rec[lo:hi], dc_rec[lo:hi],
                              min(max(n_next - lo, 0), hi - lo), prev_c[lo:hi], tc[lo:hi])

    @njit(**opts)
    def softmax_xent32_split(parts, scores, b, targets, inv_norm, row_loss, partials):
        # each part's rows start a block of partial sums (the blocks are the serial kernel's)
        M = scores.shape[0]
        B = PARTIAL_ROWS
        for p in prange(parts):
            wide_vectors()
            lo, hi = bounds(M, parts, p, B)
            softmax_xent32(scores[lo:hi], b, targets[lo:hi], inv_norm, row_loss[lo:hi],
                           partials[lo // B : (hi + B - 1) // B])

    @njit(inline="always")
    def first_block(starts, count, target):
        # the first block of PARTIAL_ROWS words whose positions start at or after target
        B = PARTIAL_ROWS
        blocks = (count + B - 1) // B
        b = 0
        while b < blocks and starts[min(b * B, count)] < target:
            b += 1
        return b

    try:  # a fixed uuid (see _build_cpu)
        first_block._set_uuid("dtrain.kernels.cpu.first_block.v1")
    except (AttributeError, AssertionError):
        pass

    @njit(**opts)
    def embed_rows_split(parts, dx, order, starts, rows, partials, count):
        # each part whole blocks of PARTIAL_ROWS words, about as many positions each
        total = starts[count]
        for p in prange(parts):
            wide_vectors()
            lo = first_block(starts, count, total * p // parts) * PARTIAL_ROWS
            hi = count if p == parts - 1 else min(first_block(starts, count, total * (p + 1) // parts) * PARTIAL_ROWS,
                                                  count)
            embed_rows(dx, order, starts, rows, partials, lo, hi)

    @njit(**opts)
    def adam_split(parts, p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        n = p.size
        for q in prange(parts):
            lo, hi = bounds(n, parts, q, 16)
            adam(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], lr, b1, b2, eps, bias1, bias2)

    @njit(**opts)
    def count_nonfinite_split(parts, bits, exponent):
        n = bits.size
        count = 0
        for q in prange(parts):
            lo, hi = bounds(n, parts, q, 16)
            count += count_nonfinite(bits[lo:hi], exponent)
        return count

    @njit(**opts)
    def gather_rows_split(parts, src, idx, out):
        bad = 0
        for p in prange(parts):
            lo, hi = bounds(out.shape[0], parts, p, 1)
            bad += gather_rows(src, idx, out, lo, hi)
        return bad

    @njit(**opts)
    def scatter_rows_split(parts, src, pos, out):
        for p in prange(parts):
            lo, hi = bounds(out.shape[0], parts, p, 1)
            scatter_rows(src, pos, out, lo, hi)

    @njit(**opts)
    def scatter_ids_split(parts, rows, ids, out):
        for p in prange(parts):
            lo, hi = bounds(out.shape[0], parts, p, 1)
            scatter_ids(rows, ids, out, lo, hi)

    @njit(**opts)
    def prev_h_rows_split(parts, Hp, h0, offsets, out):
        for p in prange(parts):
            lo, hi = bounds(out.shape[0], parts, p, 1)
            prev_h_rows(Hp, h0, offsets, out, lo, hi)

    return SimpleNamespace(lstm_fwd32=lstm_fwd32_split, lstm_fwd32_acc=lstm_fwd32_acc_split, lstm_bwd_in_place=lstm_bwd_split,
                           softmax_xent32=softmax_xent32_split, embed_rows=embed_rows_split,
                           adam=adam_split, count_nonfinite=count_nonfinite_split,
                           gather_rows=gather_rows_split, scatter_rows=scatter_rows_split,
                           scatter_ids=scatter_ids_split, prev_h_rows=prev_h_rows_split)


def _build_blas(k):
    """OpenBLAS entry points NumPy does not offer, called through their addresses from
    compiled code (cached like the kernels; a ctypes call costs more than the work at
    the recurrent steps' sizes). The out-of-place transpose (omatcopy): its address
    per dtype, ``omatcopy`` (a whole matrix, one thread: split across the pool it was
    no faster, 512 x n float32, n = 4..128) and the LSTM backward step that first
    copies its dh_rec rows from the recurrent GEMM's transposed result (``lstm_bwd_T``,
    and ``lstm_bwd_T_split`` on the pool: each thread its own rows, which it then reads
    from its cache). The float32 GEMM that adds its product to its output
    (``gemm_acc``, sgemm with beta = 1; ``gemm_addresses``). None without OpenBLAS."""
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    try:
        library = openblas.loaded()[0]
    except Exception:  # another BLAS, no threadpoolctl
        return None
    addresses, gemm_addresses = {}, {}
    for dtype, name in ((np.float32, "cblas_somatcopy"), (np.float64, "cblas_domatcopy")):
        fn = library.symbol(name)
        if fn is not None:
            addresses[np.dtype(dtype)] = ctypes.cast(fn, ctypes.c_void_p).value
    fn = library.symbol("cblas_sgemm")
    if fn is not None:
        gemm_addresses[np.dtype(np.float32)] = ctypes.cast(fn, ctypes.c_void_p).value
    ilp64 = library.blasint is ctypes.c_int64

    @intrinsic
    def call_omatcopy(typingctx, fn, rows, cols, alpha, a, lda, b, ldb):
        # fn(CblasRowMajor, CblasTrans, rows, cols, alpha, a, lda, b, ldb); integers as
        # this library's BLAS integers, pointers given as integers
        def codegen(context, builder, signature, args):
            i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
            blasint = ir.IntType(64 if ilp64 else 32)
            real = context.get_value_type(signature.args[3])
            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, blasint, blasint, real, i8p, blasint, i8p, blasint])
            target = builder.inttoptr(args[0], fnty.as_pointer())
            n = (lambda v: v) if ilp64 else (lambda v: builder.trunc(v, blasint))
            builder.call(target, [ir.Constant(i32, openblas.CBLAS_ROW_MAJOR), ir.Constant(i32, openblas.CBLAS_TRANS),
                                  n(args[1]), n(args[2]), args[3], builder.inttoptr(args[4], i8p), n(args[5]),
                                  builder.inttoptr(args[6], i8p), n(args[7])])
            return context.get_dummy_value()
        return types.void(types.intp, types.intp, types.intp, alpha, types.intp, types.intp, types.intp,
                          types.intp), codegen

    try:  # a fixed uuid per integer width (see _build_cpu)
        call_omatcopy._set_uuid(f"dtrain.kernels.cpu.call_omatcopy.{'ilp64' if ilp64 else 'lp64'}.v1")
    except (AttributeError, AssertionError):
        pass

    @intrinsic
    def call_gemm(typingctx, fn, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        # fn(CblasRowMajor, CblasNoTrans, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
        # ldc): c = alpha a op(b) + beta c
        def codegen(context, builder, signature, args):
            i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
            blasint = ir.IntType(64 if ilp64 else 32)
            real = context.get_value_type(signature.args[5])
            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, blasint, blasint, blasint, real, i8p, blasint,
                                                   i8p, blasint, real, i8p, blasint])
            target = builder.inttoptr(args[0], fnty.as_pointer())
            n_ = (lambda v: v) if ilp64 else (lambda v: builder.trunc(v, blasint))
            builder.call(target, [ir.Constant(i32, openblas.CBLAS_ROW_MAJOR), ir.Constant(i32, openblas.CBLAS_NO_TRANS),
                                  builder.trunc(args[1], i32), n_(args[2]), n_(args[3]), n_(args[4]), args[5],
                                  builder.inttoptr(args[6], i8p), n_(args[7]), builder.inttoptr(args[8], i8p),
                                  n_(args[9]), args[10], builder.inttoptr(args[11], i8p), n_(args[12])])
            return context.get_dummy_value()
        return types.void(types.intp, types.intp, types.intp, types.intp, types.intp, alpha, types.intp,
                          types.intp, types.intp, types.intp, alpha, types.intp, types.intp), codegen

    try:
        call_gemm._set_uuid(f"dtrain.kernels.cpu.call_gemm.{'ilp64' if ilp64 else 'lp64'}.v2")
    except (AttributeError, AssertionError):
        pass
    no_trans, trans = np.intp(openblas.CBLAS_NO_TRANS), np.intp(openblas.CBLAS_TRANS)

    @njit(cache=True, nogil=True)
    def gemm_acc(fn, a, b, c):
        # c += a @ b (beta = 1), every operand C-contiguous
        m, k = a.shape
        one = a.dtype.type(1.0)
        call_gemm(fn, no_trans, np.intp(m), np.intp(b.shape[1]), np.intp(k), one, np.intp(a.ctypes.data),
                  np.intp(k), np.intp(b.ctypes.data), np.intp(b.shape[1]), one, np.intp(c.ctypes.data),
                  np.intp(c.shape[1]))

    @njit(cache=True, nogil=True)
    def gemm_bt(fn, a, b, c):
        # c = a @ b.T (beta = 0); a (m, k), b (n, k), c (m, n), each with unit column stride
        # (rows may be farther apart): the call numpy.matmul makes for these layouts when
        # m, n > 1 (it calls gemv for one row or column)
        m, k = a.shape
        item = a.itemsize
        call_gemm(fn, trans, np.intp(m), np.intp(b.shape[0]), np.intp(k), a.dtype.type(1.0), np.intp(a.ctypes.data),
                  np.intp(a.strides[0] // item), np.intp(b.ctypes.data), np.intp(b.strides[0] // item),
                  a.dtype.type(0.0), np.intp(c.ctypes.data), np.intp(c.strides[0] // item))

    @njit(cache=True, nogil=True)
    def omatcopy(fn, src, out):
        # out = src.T; alpha = 1 copies each element as it is (NaNs and signed zeros too)
        rows, cols = src.shape
        one = src.dtype.type(1.0)
        call_omatcopy(fn, np.intp(rows), np.intp(cols), one, np.intp(src.ctypes.data), np.intp(cols),
                      np.intp(out.ctypes.data), np.intp(rows))

    @njit(nogil=True)
    def rows_from_T(fn, src_T, out, lo, hi):
        # out[lo:hi] = src_T[:, lo:hi].T; src_T (H, m) and out (rows, H) C-contiguous
        if hi > lo:
            H, m = src_T.shape
            item = src_T.itemsize
            call_omatcopy(fn, np.intp(H), np.intp(hi - lo), src_T.dtype.type(1.0),
                          np.intp(src_T.ctypes.data + lo * item), np.intp(m),
                          np.intp(out.ctypes.data + lo * out.shape[1] * item), np.intp(out.shape[1]))

    try:
        rows_from_T._set_uuid(f"dtrain.kernels.cpu.rows_from_T.{'ilp64' if ilp64 else 'lp64'}.v1")
    except (AttributeError, AssertionError):
        pass
    lstm_bwd_in_place = k.lstm_bwd_in_place

    @njit(cache=True, nogil=True, error_model="numpy")
    def lstm_bwd_T(fn, src_T, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
        rows_from_T(fn, src_T, dh_rec, 0, n_next)
        lstm_bwd_in_place(a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)

    @njit(cache=True, nogil=True, error_model="numpy", parallel=True)
    def lstm_bwd_T_split(parts, fn, src_T, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
        n = a.shape[0]
        for p in prange(parts):
            lo = n * p // parts
            hi = n * (p + 1) // parts
            rows_from_T(fn, src_T, dh_rec, lo, min(hi, n_next))
            lstm_bwd_in_place(a[lo:hi], dh_up[lo:hi], dh_rec[lo:hi], dc_rec[lo:hi],
                              min(max(n_next - lo, 0), hi - lo), prev_c[lo:hi], tc[lo:hi])

    @intrinsic
    def read_ticks(typingctx):
        # the CPU's time-stamp counter (llvm.readcyclecounter): how long the GEMMs inside a
        # compiled time loop took, for the floor profiler (a few cycles to read)
        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(64), [])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
            return builder.call(fn, [])
        return types.int64(), codegen

    try:
        read_ticks._set_uuid("dtrain.kernels.cpu.read_ticks.v1")
        gemm_acc._set_uuid(f"dtrain.kernels.cpu.gemm_acc.{'ilp64' if ilp64 else 'lp64'}.v2")
        gemm_bt._set_uuid(f"dtrain.kernels.cpu.gemm_bt.{'ilp64' if ilp64 else 'lp64'}.v1")
    except (AttributeError, AssertionError):
        pass
    lstm_fwd32_acc = k.lstm_fwd32_acc

    @njit(cache=True, nogil=True)
    def ticks_now():
        return read_ticks()

    # The LSTM's forward time loop in one call (float32, the recurrent GEMM adding to the gate
    # rows): per time step the GEMM through its address, then the gate kernel; no Python per
    # step. The same calls in the same order as the cell's Python loop, so the same bits;
    # gemm_ticks[0] gets the time-stamp ticks spent in the GEMMs.
    @njit(inline="always")
    def forward_gemm(fn, t, gates, C, PH, h0, c0, Wh, sizes, offsets, gemm_ticks):
        # step t's recurrent GEMM, timed: h_{t-1} Wh added to its gate rows; returns those
        # rows and c_{t-1}
        n, s = sizes[t], offsets[t]
        if t == 0:
            prev_h, prev_c = h0[:n], c0[:n]
        else:
            prev_h, prev_c = PH[s : s + n], C[offsets[t - 1] : offsets[t - 1] + n]
        a = gates[s : s + n]
        t0 = read_ticks()
        gemm_acc(fn, prev_h, Wh, a)
        gemm_ticks[0] += read_ticks() - t0
        return a, prev_c

    try:
        forward_gemm._set_uuid("dtrain.kernels.cpu.forward_gemm.v1")
    except (AttributeError, AssertionError):
        pass

    @njit(cache=True, nogil=True, error_model="numpy")
    def lstm_forward_loop(fn, gates, C, TC, Hp, PH, h0, c0, Wh, b, sizes, offsets, gemm_ticks):
        T = sizes.size
        for t in range(T):
            n, s = sizes[t], offsets[t]
            n_next = sizes[t + 1] if t + 1 < T else 0
            a, prev_c = forward_gemm(fn, t, gates, C, PH, h0, c0, Wh, sizes, offsets, gemm_ticks)
            lstm_fwd32_acc(a, b, prev_c, C[s : s + n], TC[s : s + n], Hp[s : s + n],
                           PH[s + n : s + n + n_next], n_next)

    @njit(cache=True, nogil=True, error_model="numpy", parallel=True)
    def lstm_forward_loop_split(parts, min_elements, fn, gates, C, TC, Hp, PH, h0, c0, Wh, b, sizes, offsets,
                                gemm_ticks):
        # lstm_forward_loop with each step's gate kernel on the shared pool's threads (each
        # its own rows) when the step has at least min_elements gate entries
        T = sizes.size
        for t in range(T):
            n, s = sizes[t], offsets[t]
            n_next = sizes[t + 1] if t + 1 < T else 0
            a, prev_c = forward_gemm(fn, t, gates, C, PH, h0, c0, Wh, sizes, offsets, gemm_ticks)
            c, tc, h, hn = C[s : s + n], TC[s : s + n], Hp[s : s + n], PH[s + n : s + n + n_next]
            if a.size < min_elements:
                lstm_fwd32_acc(a, b, prev_c, c, tc, h, hn, n_next)
            else:
                for p in prange(parts):
                    lo, hi = n * p // parts, n * (p + 1) // parts
                    k = min(max(n_next - lo, 0), hi - lo)
                    lstm_fwd32_acc(a[lo:hi], b, prev_c[lo:hi], c[lo:hi], tc[lo:hi], h[lo:hi], hn[lo : lo + k], k)

    # The LSTM's backward time loop in one call (float32, gate gradients in place over the
    # gates): per time step (last first) the step's dh_rec rows copied from the previous
    # recurrent GEMM's transposed result, the gate kernel, then the recurrent GEMM: (Wh d^T)
    # into scratch for at most max_T_rows rows (left transposed for the next step, copied
    # into dh0 at t = 0), d Wh^T straight into its rows above. The cell's Python loop makes
    # the same calls (CpuKernels.gemm_transposed for the GEMMs), so the same bits.
    @njit(inline="always")
    def backward_gemm(fn, omat, d, Wh, dh_rec, dh0, scratch, t, max_T_rows, gemm_ticks):
        # the recurrent GEMM of step t, timed; True when its result waits transposed in scratch
        n, H = d.shape[0], Wh.shape[0]
        transposed = n <= max_T_rows
        out_T = scratch[: H * n if transposed else 0].reshape((H, n if transposed else 0))
        t0 = read_ticks()
        if transposed:
            gemm_bt(fn, Wh, d, out_T)
        else:
            gemm_bt(fn, d, Wh, (dh_rec if t > 0 else dh0)[:n])
        gemm_ticks[0] += read_ticks() - t0
        if transposed and t == 0:
            rows_from_T(omat, out_T, dh0, 0, n)
        return transposed and t > 0

    try:
        backward_gemm._set_uuid("dtrain.kernels.cpu.backward_gemm.v1")
    except (AttributeError, AssertionError):
        pass

    @njit(cache=True, nogil=True, error_model="numpy")
    def lstm_backward_loop(fn, omat, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0, scratch, sizes, offsets,
                           max_T_rows, gemm_ticks):
        T = sizes.size
        H = Wh.shape[0]
        pending = False
        for t in range(T - 1, -1, -1):
            n, s = sizes[t], offsets[t]
            n_next = sizes[t + 1] if t + 1 < T else 0
            prev_c = c0[:n] if t == 0 else C[offsets[t - 1] : offsets[t - 1] + n]
            d = gates[s : s + n]
            if pending:
                rows_from_T(omat, scratch[: H * n_next].reshape((H, n_next)), dh_rec, 0, n_next)
            lstm_bwd_in_place(d, dH[s : s + n], dh_rec, dc_rec, n_next, prev_c, TC[s : s + n])
            pending = backward_gemm(fn, omat, d, Wh, dh_rec, dh0, scratch, t, max_T_rows, gemm_ticks)

    @njit(cache=True, nogil=True, error_model="numpy", parallel=True)
    def lstm_backward_loop_split(parts, min_elements, fn, omat, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0,
                                 scratch, sizes, offsets, max_T_rows, gemm_ticks):
        # lstm_backward_loop with each step's copy and gate kernel on the shared pool's
        # threads (each its own rows) when the step has at least min_elements gate entries
        T = sizes.size
        H = Wh.shape[0]
        pending = False
        for t in range(T - 1, -1, -1):
            n, s = sizes[t], offsets[t]
            n_next = sizes[t + 1] if t + 1 < T else 0
            prev_c = c0[:n] if t == 0 else C[offsets[t - 1] : offsets[t - 1] + n]
            d, dh_up, tc = gates[s : s + n], dH[s : s + n], TC[s : s + n]
            m = n_next if pending else 0  # the previous GEMM's result, (H, n_next), when it waits
            src_T = scratch[: H * m].reshape((H, m))
            if d.size < min_elements:
                if pending:
                    rows_from_T(omat, src_T, dh_rec, 0, n_next)
                lstm_bwd_in_place(d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
            else:
                for p in prange(parts):
                    lo, hi = n * p // parts, n * (p + 1) // parts
                    if pending:
                        rows_from_T(omat, src_T, dh_rec, lo, min(hi, n_next))
                    lstm_bwd_in_place(d[lo:hi], dh_up[lo:hi], dh_rec[lo:hi], dc_rec[lo:hi],
                                      min(max(n_next - lo, 0), hi - lo), prev_c[lo:hi], tc[lo:hi])
            pending = backward_gemm(fn, omat, d, Wh, dh_rec, dh0, scratch, t, max_T_rows, gemm_ticks)

    return SimpleNamespace(addresses=addresses, omatcopy=omatcopy, lstm_bwd_T=lstm_bwd_T,
                           lstm_bwd_T_split=lstm_bwd_T_split, gemm_addresses=gemm_addresses, gemm_acc=gemm_acc,
                           gemm_bt=gemm_bt, lstm_forward_loop=lstm_forward_loop,
                           lstm_forward_loop_split=lstm_forward_loop_split, lstm_backward_loop=lstm_backward_loop,
                           lstm_backward_loop_split=lstm_backward_loop_split, ticks_now=ticks_now)


def _blas():
    """``_build_blas``'s namespace, built once (addresses empty without OpenBLAS)."""
    global _BLAS
    if _BLAS is None:
        if _CPU is None:
            raise RuntimeError("the CPU kernels are built first (CpuKernels())")
        _BLAS = _build_blas(_CPU) or SimpleNamespace(addresses={}, gemm_addresses={})
    return _BLAS


def _split(elements):
    """(the split kernels, parts) when a call of this size runs on the shared pool, else (None, 1)."""
    global _SPLIT
    parts = pool.threads()
    if parts <= 1 or elements < SPLIT_MIN_ELEMENTS:
        return None, 1
    if _SPLIT is None:
        _SPLIT = _build_split(_CPU)
    return _SPLIT, parts


class CpuKernels:
    """Numba kernels with the call signatures the cells, the model and Adam use."""

    name = "numba"
    # The cells may let a backward step write its gate gradients over the gates, and an
    # LSTM forward step write the next step's prev_h rows (h_next).
    backward_in_place = True
    forward_copies_prev_h = True

    def __init__(self, dtype):
        global _CPU
        if _CPU is None:
            _CPU = _build_cpu()
        k = _CPU
        (self._lstm_fwd, self._lstm_bwd_in_place, self._rnn_fwd, self._rnn_bwd,
         self._softmax_xent, self._adam, self._lstm_fwd32, self._rnn_fwd32, self._gru_fwd32,
         self._softmax_xent32, self._gru_fwd, self._gru_bwd, self._quantize_add,
         self._quantize_add_rows, self._embed_group, self._embed_rows, self._exp32_into,
         self._count_nonfinite) = (
            k.lstm_fwd, k.lstm_bwd_in_place, k.rnn_fwd, k.rnn_bwd, k.softmax_xent, k.adam,
            k.lstm_fwd32, k.rnn_fwd32, k.gru_fwd32, k.softmax_xent32, k.gru_fwd, k.gru_bwd,
            k.quantize_add, k.quantize_add_rows, k.embed_group, k.embed_rows, k.exp32_into,
            k.count_nonfinite)
        self._gather_rows, self._scatter_rows, self._prev_h_rows = k.gather_rows, k.scatter_rows, k.prev_h_rows
        self._scatter_ids, self._pack_captions = k.scatter_ids, k.pack_captions
        self._sum_partials, self._lstm_fwd32_acc = k.sum_partials, k.lstm_fwd32_acc
        self._partials = np.empty(0, dtype=dtype)  # the softmax's per-block column sums
        self._gemm_ticks = np.zeros(1, dtype=np.int64)
        self.last_gemm_ticks = 0
        self._order, self._starts = np.empty(0, dtype=np.int64), np.empty(1, dtype=np.int64)
        self._embed_partials = np.empty((0, 0), dtype=dtype)  # the embedding rows' per-block sums
        self._empty_rows = {}
        self.dtype = np.dtype(dtype)
        self._row_loss = np.empty(0, dtype=np.float64)
        self._zeros = np.empty(0, dtype=self.dtype)
        self._counts = np.empty(0, dtype=np.int64)  # embed_group's per-word counts
        self._ids = np.empty(0, dtype=np.int64)
        self._rows = np.empty((0, 0), dtype=self.dtype)
        # float32 runs the one-pass kernels built on exp32 (vectorised; at most 1.1 ulp
        # from the correctly rounded exp); float64 (the exactness checks) runs the
        # one-pass kernels built on libm's tanh and exp.
        self.fast32 = self.dtype == np.float32

    def lstm_step_forward(self, a, r, prev_c, c, tc, h, bias, h_next=None):
        """One LSTM step in place; ``a`` holds x Wx (its bias ``bias`` not yet added) and
        ``r`` h Wh, or ``r`` is None and ``a`` holds both (``gemm_accumulate`` added the
        recurrent product to it: ``forward_accumulates``). ``h_next``, when given (k <= n
        rows), also receives h's first k rows: the next step's block of prev_h
        (``forward_copies_prev_h``)."""
        n = a.shape[0]
        if self.fast32:
            if h_next is None:
                h_next = self._no_rows(h)
            split, parts = _split(a.size)
            if r is None:
                if split is not None:
                    split.lstm_fwd32_acc(parts, a, bias, prev_c[:n], c, tc, h, h_next, h_next.shape[0])
                else:
                    self._lstm_fwd32_acc(a, bias, prev_c[:n], c, tc, h, h_next, h_next.shape[0])
                return
            zero = self._zero_bias(a.shape[1])
            if split is not None:
                split.lstm_fwd32(parts, a, r, bias, prev_c[:n], c, tc, h, h_next, h_next.shape[0], zero)
                return
            self._lstm_fwd32(a, r, bias, prev_c[:n], c, tc, h, h_next, h_next.shape[0], zero)
        else:
            if r is None:
                raise ValueError("lstm_step_forward: r=None (a accumulated) is for float32 only")
            a += bias
            self._lstm_fwd(a, r, prev_c[:n], c, tc, h)
            if h_next is not None:
                h_next[...] = h[: h_next.shape[0]]

    def _no_rows(self, like):
        """An empty (0, H) array of ``like``'s dtype (kept: the hot path allocates nothing)."""
        key = (like.shape[1], like.dtype)
        empty = self._empty_rows.get(key)
        if empty is None:
            empty = self._empty_rows[key] = np.empty((0, like.shape[1]), like.dtype)
        return empty

    def exp32(self, x, out=None):
        """The float32 kernels' exp of a 1-D float32 array, x in [-87, 88]."""
        out = np.empty_like(x) if out is None else out
        self._exp32_into(x, out)
        return out

    def lstm_step_backward(self, d, dh_up, dh_rec, dc_rec, n_next, a, prev_c, tc, dh_rec_T=None):
        """One LSTM step back into ``d``, which may be ``a`` itself (the training step's case:
        the gate gradients replace the gates); otherwise ``a`` is copied there first.
        ``dh_rec_T`` (H, n_next), when given, is the transpose of the dh_rec rows the step
        reads: each thread copies its own rows first (``backward_reads_transposed``)."""
        if d is not a:
            np.copyto(d, a)
        split, parts = _split(d.size)
        if dh_rec_T is not None:
            address = _blas().addresses.get(d.dtype)
            if address is None or dh_rec_T.shape != (dh_rec.shape[1], n_next) \
                    or not (dh_rec_T.flags.c_contiguous and dh_rec.flags.c_contiguous):
                dh_rec[:n_next] = dh_rec_T.T
            else:
                t = _BLAS
                if split is not None:
                    t.lstm_bwd_T_split(parts, address, dh_rec_T, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
                else:
                    t.lstm_bwd_T(address, dh_rec_T, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
                return
        if split is not None:
            split.lstm_bwd_in_place(parts, d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
        else:
            self._lstm_bwd_in_place(d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)

    def rnn_step_forward(self, a, r):
        if self.fast32:
            self._rnn_fwd32(a, r)
        else:
            self._rnn_fwd(a, r)

    def rnn_step_backward(self, d, dh_up, dh_rec, n_next, h):
        self._rnn_bwd(d, dh_up, dh_rec, n_next, h)

    def gru_step_forward(self, a, r, prev_h, hn, h):
        (self._gru_fwd32 if self.fast32 else self._gru_fwd)(a, r, prev_h, hn, h)

    def gru_step_backward(self, dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h):
        self._gru_bwd(dax, dah, dh_up, dh_rec, carry, n_next, a, hn, prev_h)

    def softmax_cross_entropy(self, scores, targets, normalizer, bias=None, bias_grad=None):
        """Loss (float) and, in place in ``scores``, its gradient; ``bias`` (V,), when
        given, is added to every row of ``scores`` first; ``bias_grad`` (V,), when given,
        receives the gradient's column sums (the gradient of ``bias``)."""
        M = scores.shape[0]
        if self._row_loss.size < M:
            self._row_loss = alloc.empty(M, np.float64)
        row_loss = self._row_loss[:M]
        if self.fast32:
            V = scores.shape[1]
            if bias is None:
                bias = self._zero_bias(V)
            blocks = 0 if bias_grad is None else -(-M // PARTIAL_ROWS)
            if self._partials.size < blocks * V:
                self._partials = alloc.empty(blocks * V, self.dtype)
            partials = self._partials[: blocks * V].reshape(blocks, V)
            split, parts = _split(scores.size)
            if split is not None:
                split.softmax_xent32(parts, scores, bias, targets, 1.0 / normalizer, row_loss, partials)
            else:
                self._softmax_xent32(scores, bias, targets, 1.0 / normalizer, row_loss, partials)
            if bias_grad is not None:
                self._sum_partials(partials, bias_grad)
        else:
            if bias is not None:
                scores += bias
            self._softmax_xent(scores, targets, 1.0 / normalizer, row_loss)
            if bias_grad is not None:
                scores.sum(axis=0, out=bias_grad)
        return float(row_loss.sum()) / normalizer

    def _zero_bias(self, V):
        if self._zeros.size < V:
            self._zeros = alloc.zeros(V, self.dtype)
        return self._zeros[:V]

    def embedding_grad_sparse(self, words, dx, vocab_size, col_sum=None):
        """(ids, rows) as ``layers.embedding_grad_sparse``, in this object's buffers (views);
        ``col_sum`` (W,), when given, receives dx's column sums from the same pass (as the
        sums of the rows, in blocks of PARTIAL_ROWS words)."""
        M, W = dx.shape
        if self._counts.size < vocab_size + 1:
            self._counts = alloc.empty(vocab_size + 1, np.int64)
        if self._ids.size < M or self._rows.shape[1] != W:
            self._ids = alloc.empty(max(M, 1), np.int64)
            self._rows = alloc.empty((max(M, 1), W), self.dtype)
        if self._order.size < M:
            self._order = alloc.empty(M, np.int64)
            self._starts = alloc.empty(M + 1, np.int64)
        count = self._embed_group(words, self._counts[: vocab_size + 1], self._ids, self._starts, self._order)
        blocks = -(-count // PARTIAL_ROWS) if col_sum is not None else 0
        if self._embed_partials.shape[0] < blocks or self._embed_partials.shape[1] != W:
            self._embed_partials = alloc.empty((max(blocks, 1), W), self.dtype)
        partials = self._embed_partials[:blocks]
        split, parts = _split(dx.size)
        if split is not None:
            split.embed_rows(parts, dx, self._order, self._starts, self._rows, partials, count)
        else:
            self._embed_rows(dx, self._order, self._starts, self._rows, partials, 0, count)
        if col_sum is not None:
            self._sum_partials(partials, col_sum)
        return self._ids[:count], self._rows[:count]

    def all_finite(self, a):
        """True when no entry of the contiguous float array ``a`` is inf or nan."""
        if a.dtype == np.float32:
            bits, exponent = a.reshape(-1).view(np.int32), np.int32(0x7F800000)
        elif a.dtype == np.float64:
            bits, exponent = a.reshape(-1).view(np.int64), np.int64(0x7FF0000000000000)
        else:
            return bool(np.isfinite(a).all())
        split, parts = _split(bits.size)
        if split is not None:
            return split.count_nonfinite(parts, bits, exponent) == 0
        return self._count_nonfinite(bits, exponent) == 0

    def gather_rows(self, src, idx, out):
        """out[i] = src[idx[i]]: ``np.take(src, idx, axis=0, out=out)`` (2-D, C-contiguous)."""
        split, parts = _split(out.size)
        if split is not None:
            bad = split.gather_rows(parts, src, idx, out)
        else:
            bad = self._gather_rows(src, idx, out, 0, out.shape[0])
        if bad:
            wrong = idx[(idx < 0) | (idx >= src.shape[0])]
            raise IndexError(f"index {int(wrong[0])} is out of bounds for axis 0 with size {src.shape[0]}")
        return out

    def scatter_rows(self, src, pos, out):
        """``out.fill(0); out[pos] = src`` in one pass (``pos`` ascending, distinct)."""
        split, parts = _split(out.size)
        if split is not None:
            split.scatter_rows(parts, src, pos, out)
        else:
            self._scatter_rows(src, pos, out, 0, out.shape[0])
        return out

    def pack_captions(self, captions, null_idx):
        """``model.pack_captions``'s (order, batch_sizes, words_in, targets, is_real, num_tokens)
        for (N, T+1) integer captions (host NumPy), compiled: 0.1 ms less per step."""
        captions = np.ascontiguousarray(captions)
        return self._pack_captions(captions, captions.dtype.type(null_idx))

    def scatter_ids(self, rows, ids, out):
        """``out.fill(0); out[ids] = rows`` in one call (``ids`` distinct; 2-D, C-contiguous):
        the dense W_embed gradient from its sparse rows."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= out.shape[0]):
            wrong = ids[(ids < 0) | (ids >= out.shape[0])]
            raise IndexError(f"index {int(wrong[0])} is out of bounds for axis 0 with size {out.shape[0]}")
        split, parts = _split(out.size)
        if split is not None:
            split.scatter_ids(parts, rows, ids, out)
        else:
            self._scatter_ids(rows, ids, out, 0, out.shape[0])
        return out

    def prev_h_rows(self, Hp, h0, offsets, out):
        """``layers.prev_h_packed`` in one pass: ``offsets`` the packed block starts (T+1)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        split, parts = _split(out.size)
        if split is not None:
            split.prev_h_rows(parts, Hp, h0, offsets, out)
        else:
            self._prev_h_rows(Hp, h0, offsets, out, 0, out.shape[0])
        return out

    def copy_transposed(self, src, out):
        """``out[...] = src.T`` (2-D, C-contiguous): OpenBLAS's omatcopy where it is found
        (512 x 128 float32: 19 us against NumPy's 92; 64 columns: 9 against 44)."""
        transpose = _blas()
        address = transpose.addresses.get(src.dtype)
        if address is None or out.dtype != src.dtype or out.shape != src.shape[::-1] \
                or not (src.flags.c_contiguous and out.flags.c_contiguous):
            out[...] = src.T
        else:
            transpose.omatcopy(address, src, out)
        return out

    @property
    def forward_accumulates(self):
        """True when ``gemm_accumulate`` runs OpenBLAS's sgemm with beta = 1 (float32): the
        LSTM's recurrent GEMM then adds h Wh to the step's gate rows, and the forward step
        reads one operand instead of two."""
        return self.fast32 and self.dtype in _blas().gemm_addresses

    def gemm_accumulate(self, a, b, out):
        """``out += a @ b`` by one GEMM (beta = 1) where ``forward_accumulates``; 2-D, C-contiguous."""
        blas = _blas()
        address = blas.gemm_addresses.get(out.dtype)
        if address is None or not (a.dtype == b.dtype == out.dtype) or a.shape[1] != b.shape[0] \
                or out.shape != (a.shape[0], b.shape[1]) \
                or not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
            out += a @ b
        elif out.size:
            blas.gemm_acc(address, a, b, out)
        return out

    def lstm_forward_loop(self, gates, C, TC, Hp, PH, h0, c0, Wh, b, batch_sizes, offsets):
        """The LSTM's packed forward time loop in one compiled call (``forward_accumulates``;
        PH[:n0] already holds h0's rows): per step ``gemm_accumulate(prev_h, Wh, gate rows)``
        and ``lstm_step_forward(..., r=None, h_next=...)``, with no Python between them.
        ``last_gemm_ticks``: the time-stamp ticks its GEMMs took (``ticks_to_seconds``)."""
        blas = _blas()
        sizes = np.asarray(batch_sizes, dtype=np.int64)
        starts = np.asarray(offsets, dtype=np.int64)
        self._gemm_ticks[0] = 0
        address = blas.gemm_addresses[np.dtype(np.float32)]
        parts = pool.threads()
        if parts > 1:
            blas.lstm_forward_loop_split(parts, SPLIT_MIN_ELEMENTS, address, gates, C, TC, Hp, PH, h0, c0, Wh, b,
                                         sizes, starts, self._gemm_ticks)
        else:
            blas.lstm_forward_loop(address, gates, C, TC, Hp, PH, h0, c0, Wh, b, sizes, starts, self._gemm_ticks)
        self.last_gemm_ticks = int(self._gemm_ticks[0])

    def gemm_transposed(self, a, b, out):
        """``out = a @ b.T`` (2-D; a, b and out with unit column strides): for float32, the
        sgemm numpy.matmul calls for these layouts, through its address, also for one row
        or column (where matmul calls gemv), so that the compiled backward loop and the
        cell's Python loop make the same calls; NumPy otherwise."""
        address = _blas().gemm_addresses.get(out.dtype)
        if address is None or not (a.dtype == b.dtype == out.dtype) or a.shape[1] != b.shape[1] \
                or out.shape != (a.shape[0], b.shape[0]) or 0 in out.shape \
                or not (a.strides[1] == b.strides[1] == out.strides[1] == out.itemsize):
            return np.matmul(a, b.T, out=out)
        _BLAS.gemm_bt(address, a, b, out)
        return out

    def lstm_backward_loop(self, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0, scratch, batch_sizes, offsets,
                           max_transposed_rows):
        """The LSTM's packed backward time loop in one compiled call (float32, in place, with
        ``backward_reads_transposed``): the cell's loop over ``lstm_step_backward`` and the
        recurrent GEMMs (``gemm_transposed``; (Wh d^T) for at most ``max_transposed_rows``
        rows), with no Python per step. ``last_gemm_ticks``: the time-stamp ticks its GEMMs
        took."""
        blas = _blas()
        sizes = np.asarray(batch_sizes, dtype=np.int64)
        starts = np.asarray(offsets, dtype=np.int64)
        self._gemm_ticks[0] = 0
        fn, omat = blas.gemm_addresses[np.dtype(np.float32)], blas.addresses[np.dtype(np.float32)]
        rows = max_transposed_rows
        parts = pool.threads()
        if parts > 1:
            blas.lstm_backward_loop_split(parts, SPLIT_MIN_ELEMENTS, fn, omat, gates, dH, dh_rec, dc_rec, C, c0, TC,
                                          Wh, dh0, scratch, sizes, starts, rows, self._gemm_ticks)
        else:
            blas.lstm_backward_loop(fn, omat, gates, dH, dh_rec, dc_rec, C, c0, TC, Wh, dh0, scratch, sizes, starts,
                                    rows, self._gemm_ticks)
        self.last_gemm_ticks = int(self._gemm_ticks[0])

    @staticmethod
    def ticks_to_seconds(ticks):
        """Seconds of ``ticks`` of the time-stamp counter the compiled loops read (its rate
        measured once per process against ``time.perf_counter``, over 20 ms)."""
        global _TICK_HZ
        if _TICK_HZ is None:
            now = _blas().ticks_now
            now()
            t0, k0 = time.perf_counter(), now()
            while time.perf_counter() - t0 < 0.02:
                pass
            _TICK_HZ = (now() - k0) / (time.perf_counter() - t0)
        return ticks / _TICK_HZ

    @property
    def backward_reads_transposed(self):
        """True when ``lstm_step_backward`` copies its dh_rec rows itself from ``dh_rec_T``
        (omatcopy found): the cells then leave the recurrent GEMM's result transposed."""
        return self.dtype in _blas().addresses

    def adam_update(self, p, g, m, v, lr, b1, b2, eps, bias1, bias2):
        split, parts = _split(p.size)
        if split is not None:
            split.adam(parts, p, g, m, v, lr, b1, b2, eps, bias1, bias2)
        else:
            self._adam(p, g, m, v, lr, b1, b2, eps, bias1, bias2)

    def quantize_add(self, acc, g, scale):
        """acc (int64) += rint(g * scale); returns max |g| (float)."""
        return float(self._quantize_add(acc, g, scale))

    def quantize_add_rows(self, acc, ids, rows, scale):
        """acc[ids[i]] (int64 rows) += rint(rows[i] * scale), ids unique; returns max |rows|."""
        return float(self._quantize_add_rows(acc, ids, rows, scale))
