"""The bf16 SUM over ranks (``Communicator.allreduce_sum_bf16_``) and the contiguous
buckets that split a flat buffer for one reduction per piece."""

from __future__ import annotations

import numpy as np

from .mpi_load import is_cupy
from .staging import sync_device

# |bf16 sum - exact sum| <= BF16_SUM_BOUND * sum over ranks of |g_r|, per entry: every term is
# rounded to bf16 once (2^-8), the float32 sum adds (P-1) 2^-24 (far below), and the
# sum is rounded once more (2^-8 of |sum| <= sum |g_r|).
BF16_SUM_BOUND = 2.0**-7 * (1 + 2.0**-6)


def widen(bits: np.ndarray, out: np.ndarray) -> None:
    """float32 values of bf16 ``bits`` into ``out`` (exact: bf16 is a float32's upper half)."""
    np.left_shift(bits, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)


def bucket_bounds(n: int, buckets: int) -> list[tuple[int, int]]:
    """``buckets`` contiguous [lo, hi) pieces covering range(n), empty ones dropped."""
    buckets = max(1, int(buckets))
    edges = [n * i // buckets for i in range(buckets + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def allreduce_sum_bf16(comm, buf) -> None:
    """In-place SUM over the ranks of the Communicator ``comm`` of a float32 1-D ``buf``
    (numpy or cupy, already checked flat and float32), sent as bf16, summed in float32.

    Each rank owns one contiguous chunk of the buffer (``bucket_bounds(n, size)``).
    An Alltoallv sends every rank's chunks, rounded to bf16 (round to nearest even),
    to their owners; each owner sums the ``size`` bf16 values of an entry in float32,
    in rank order, rounds the sum to bf16, and an Allgatherv gives every rank every
    chunk. So every rank holds the same bits, half the bytes of a float32 ring
    Allreduce move, and each entry is within ``BF16_SUM_BOUND * sum_r |g_r|`` of the
    exact sum (each term rounded once, the sum once; unit roundoff 2^-8 each).
    """
    from ..kernels.bf16 import to_bf16  # deferred: Numba compiles it on first use

    MPI, size, rank = comm.MPI, comm.size, comm.rank
    comm._enter("allreduce_sum_bf16_", buf.size, buf.dtype, buf.nbytes // 2)
    host = buf.get() if is_cupy(buf) else buf
    bounds = bucket_bounds(host.size, size) if host.size >= size else \
        [(min(i, host.size), min(i + 1, host.size)) for i in range(size)]
    counts = [hi - lo for lo, hi in bounds]
    displs = [lo for lo, _ in bounds]
    mine = counts[rank]
    send, received, total, term = comm._bf16_buffers(host.size, mine)
    to_bf16(host, out=send)
    comm.comm.Alltoallv([send, (counts, displs), MPI.UINT16_T],
                        [received, ([mine] * size, [mine * r for r in range(size)]),
                         MPI.UINT16_T])
    widen(received[:mine], total)
    for r in range(1, size):  # rank order: the same sum on whichever rank owns the chunk
        widen(received[r * mine : (r + 1) * mine], term)
        total += term
    to_bf16(total, out=send[:mine])  # the send buffer is free again: the rounded sums
    gathered = received[: host.size]
    comm.comm.Allgatherv([send[:mine], MPI.UINT16_T], [gathered, (counts, displs),
                                                       MPI.UINT16_T])
    if is_cupy(buf):
        out = np.empty(host.size, np.float32)
        widen(gathered, out)
        buf.set(out)
        sync_device()
    else:
        widen(gathered, host)  # bf16 bits -> float32, straight into the buffer
    comm._leave()
