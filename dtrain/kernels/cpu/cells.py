"""The cells' step kernels: LSTM, RNN and GRU, one step forward and back, and their split forms.

Each kernel does a step's elementwise work (gates, state update, gate gradients) in
one pass over the step's rows. float64 (the exactness checks) calls libm's tanh;
float32 runs the one-pass ``*32`` kernels on ``exp32`` (``jit.py``). A split
kernel (``*_split``) runs the serial one on each part of the rows, on the shared
pool's threads: every row is computed by the same code, so the same bits.
"""

from __future__ import annotations

import math

from numba import njit, prange

from .jit import OPTS, SPLIT_OPTS, bounds, sigm, sigmoid32, stable, tanh32, wide_vectors


@njit(**OPTS)
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


@njit(**OPTS)
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
    ai, af, ao = ar[:H], ar[H : 2 * H], ar[2 * H : S]
    for j in range(H):
        cc = af[j] * pcr[j] + ai[j] * ag[j]
        cr[j] = cc
        t = tanh32(cc)
        tcr[j] = t
        hr[j] = ao[j] * t


@njit(**OPTS)
def lstm_fwd32_acc(a, b, prev_c, c, tc, h, h_next, n_next):
    # The float32 LSTM step where a holds x Wx + h Wh (the recurrent GEMM added its
    # product to it: gemm.accumulate): the gates of (a + b); leaves the activated i, f,
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


@njit(**OPTS)
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


@njit(**OPTS)
def rnn_fwd(a, r):
    n, H = a.shape
    for row in range(n):
        for j in range(H):
            a[row, j] = math.tanh(a[row, j] + r[row, j])


@njit(**OPTS)
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


@njit(**OPTS)
def rnn_fwd32(a, r):
    # a = tanh(a + r) in place
    wide_vectors()
    n, H = a.shape
    for row in range(n):
        ar, rr = a[row], r[row]
        for j in range(H):
            ar[j] = tanh32(ar[j] + rr[j])


@njit(**OPTS)
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


@njit(**OPTS)
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


@njit(**OPTS)
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


# The split forms: part p of parts runs the serial kernel on its own rows lo..hi (the
# first of them, up to n_next, continuing into the next step).
@stable("lstm_fwd_part.v1", inline="always")
def lstm_fwd_part(p, parts, a, b, prev_c, c, tc, h, h_next, n_next):
    lo, hi = bounds(a.shape[0], parts, p, 1)
    k = min(max(n_next - lo, 0), hi - lo)
    lstm_fwd32_acc(a[lo:hi], b, prev_c[lo:hi], c[lo:hi], tc[lo:hi], h[lo:hi], h_next[lo : lo + k],
                   k)


@stable("lstm_bwd_part.v1", inline="always")
def lstm_bwd_part(p, parts, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
    lo, hi = bounds(a.shape[0], parts, p, 1)
    k = min(max(n_next - lo, 0), hi - lo)
    lstm_bwd_in_place(a[lo:hi], dh_up[lo:hi], dh_rec[lo:hi], dc_rec[lo:hi], k, prev_c[lo:hi],
                      tc[lo:hi])


@njit(**SPLIT_OPTS)
def lstm_fwd32_split(parts, a, r, b, prev_c, c, tc, h, h_next, n_next, zero):
    n = a.shape[0]
    for p in prange(parts):
        wide_vectors()
        lo, hi = bounds(n, parts, p, 1)
        k = min(max(n_next - lo, 0), hi - lo)
        lstm_fwd32(a[lo:hi], r[lo:hi], b, prev_c[lo:hi], c[lo:hi], tc[lo:hi], h[lo:hi],
                   h_next[lo : lo + k], k, zero)


@njit(**SPLIT_OPTS)
def lstm_fwd32_acc_split(parts, a, b, prev_c, c, tc, h, h_next, n_next):
    for p in prange(parts):
        wide_vectors()
        lstm_fwd_part(p, parts, a, b, prev_c, c, tc, h, h_next, n_next)


@njit(**SPLIT_OPTS)
def lstm_bwd_split(parts, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc):
    for p in prange(parts):
        lstm_bwd_part(p, parts, a, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
