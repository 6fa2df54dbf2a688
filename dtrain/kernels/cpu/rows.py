"""Row copies of the step (gathers, scatters, the packed prev_h rows) and caption packing.

Memory-bound; each serial kernel takes the rows lo..hi it writes, so that its split
form runs it on every thread of the shared pool, each on its own rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .jit import OPTS, SPLIT_OPTS, bounds


# Row copies of the step (memory-bound; the split versions below run them on every
# thread of the shared pool).
@njit(**OPTS)
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


@njit(**OPTS)
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


@njit(**OPTS)
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


@njit(**OPTS)
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


@njit(**OPTS)
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


@njit(**SPLIT_OPTS)
def gather_rows_split(parts, src, idx, out):
    bad = 0
    for p in prange(parts):
        lo, hi = bounds(out.shape[0], parts, p, 1)
        bad += gather_rows(src, idx, out, lo, hi)
    return bad


@njit(**SPLIT_OPTS)
def scatter_rows_split(parts, src, pos, out):
    for p in prange(parts):
        lo, hi = bounds(out.shape[0], parts, p, 1)
        scatter_rows(src, pos, out, lo, hi)


@njit(**SPLIT_OPTS)
def scatter_ids_split(parts, rows, ids, out):
    for p in prange(parts):
        lo, hi = bounds(out.shape[0], parts, p, 1)
        scatter_ids(rows, ids, out, lo, hi)


@njit(**SPLIT_OPTS)
def prev_h_rows_split(parts, Hp, h0, offsets, out):
    for p in prange(parts):
        lo, hi = bounds(out.shape[0], parts, p, 1)
        prev_h_rows(Hp, h0, offsets, out, lo, hi)
