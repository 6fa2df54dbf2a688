"""The row-sparse embedding gradient: the distinct words, and dx summed over each one's positions.

``embed_group`` groups the positions by word (a stable counting sort), ``embed_rows``
sums each word's rows in position order (the same bits on one thread or split by
blocks of PARTIAL_ROWS words).
"""

from __future__ import annotations

from numba import njit, prange

from .jit import OPTS, PARTIAL_ROWS, SPLIT_OPTS, wide_vectors


@njit(**OPTS)
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


@njit(**OPTS)
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


@njit(inline="always")
def first_block(starts, count, target):
    # the first block of PARTIAL_ROWS words whose positions start at or after target
    B = PARTIAL_ROWS
    blocks = (count + B - 1) // B
    b = 0
    while b < blocks and starts[min(b * B, count)] < target:
        b += 1
    return b


@njit(**SPLIT_OPTS)
def embed_rows_split(parts, dx, order, starts, rows, partials, count):
    # each part whole blocks of PARTIAL_ROWS words, about as many positions each
    total = starts[count]
    for p in prange(parts):
        wide_vectors()
        lo = first_block(starts, count, total * p // parts) * PARTIAL_ROWS
        hi = (
            count
            if p == parts - 1
            else min(first_block(starts, count, total * (p + 1) // parts) * PARTIAL_ROWS, count)
        )
        embed_rows(dx, order, starts, rows, partials, lo, hi)
