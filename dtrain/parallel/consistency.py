"""The cross-rank consistency check: ranks that should hold identical arrays do."""

from __future__ import annotations

import hashlib

import numpy as np

from .mpi_load import is_cupy


class DivergenceError(RuntimeError):
    """Ranks that should hold identical arrays do not."""

    user_error = True  # run_guarded prints the message alone, no traceback


def check_consistent(comm, array, what: str = "parameters") -> None:
    """Raise DivergenceError on every rank of the Communicator ``comm`` if ``array``
    differs between ranks.

    Compares a float64 sum and a BLAKE2 hash of the bytes (Allgather).
    """
    if comm.size == 1:
        return
    host = array.get() if is_cupy(array) else np.asarray(array)
    host = np.ascontiguousarray(host)
    digest = hashlib.blake2b(host.reshape(-1).view(np.uint8), digest_size=8).digest()
    local = np.empty(2, dtype=np.uint64)
    local[0] = np.frombuffer(digest, dtype=np.uint64)[0]
    local[1] = np.array(host.sum(dtype=np.float64)).view(np.uint64)
    table = np.empty((comm.size, 2), dtype=np.uint64)
    comm._enter("check_consistent", host.size, host.dtype, local.nbytes)
    comm.comm.Allgather(local, table)
    comm._leave()
    bad = [r for r in range(comm.size) if not np.array_equal(table[r], table[0])]
    if bad:
        sums = table[:, 1].view(np.float64)
        detail = ", ".join(f"rank {r} sum {float(sums[r])!r}" for r in [0] + bad[:4])
        raise DivergenceError(
            f"{what} diverged across ranks: rank(s) {bad} differ from rank 0 ({detail})"
        )
