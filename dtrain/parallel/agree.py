"""--debug: every rank checks that the others make the same collective call.

``agree(comm, op, count, dtype)`` runs inside ``Communicator._enter`` when
``debug_collectives`` is set; the first mismatch raises CollectiveMismatchError on
every rank, naming the ranks that differ and both calls (with their callers).
"""

from __future__ import annotations

import os
import sys

import numpy as np

# Operation codes for the --debug agreement check (names as the methods are called).
COLLECTIVES = ("barrier", "bcast_array_", "bcast_obj", "allreduce_sum_", "allreduce_scalars",
               "allgatherv", "allgatherv_rows", "allgather_scalars", "check_consistent",
               "gather_bytes", "gather_hosts", "iallreduce_sum_", "wait_sum",
               "allreduce_sum_bf16_")
_OP_CODE = {name: i for i, name in enumerate(COLLECTIVES)}
_CALLER_BYTES = 96  # where the call came from, shown in a mismatch report
# The transport's own modules: the caller shown is the first frame outside all of them.
_HERE = os.path.dirname(os.path.abspath(__file__))
_TRANSPORT_FILES = frozenset(
    os.path.join(_HERE, name + ".py")
    for name in ("comm", "agree", "pending", "bf16_sum", "gather", "layout", "consistency")
)


class CollectiveMismatchError(RuntimeError):
    """--debug: the ranks are not making the same collective call."""


def _caller() -> str:
    """``file:line function`` of the first frame outside the transport (for --debug reports)."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) in _TRANSPORT_FILES:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


def agree(comm, op: str, count: int, dtype) -> None:
    """--debug: every rank's (sequence number, operation, count, dtype), compared before
    the call on the Communicator ``comm``.

    One extra Allgather per collective; the first mismatch raises on every
    rank, naming the ranks that differ and both calls (with their callers).
    """
    rec = np.zeros(4 + _CALLER_BYTES // 8, dtype=np.int64)
    rec[:4] = (comm.seq, _OP_CODE[op], int(count),
               -1 if dtype is None else ord(np.dtype(dtype).char))
    rec.view(np.uint8)[32:][:_CALLER_BYTES] = np.frombuffer(
        _caller().encode()[:_CALLER_BYTES].ljust(_CALLER_BYTES, b"\0"), dtype=np.uint8)
    table = np.empty((comm.size, rec.size), dtype=np.int64)
    comm.comm.Allgather(rec, table)
    keys = [tuple(row[:4]) for row in table]
    if len(set(keys)) == 1:
        return
    # the call most ranks make is the reference (rank 0's on a tie)
    ref = max(keys, key=lambda k: (keys.count(k), -keys.index(k)))
    odd = [r for r, k in enumerate(keys) if k != ref]
    first = keys.index(ref)

    def show(r):
        _, code, cnt, dt = keys[r]
        where = table[r].view(np.uint8)[32:].tobytes().rstrip(b"\0").decode(errors="replace")
        kind = "" if dt < 0 else f", {np.dtype(chr(int(dt))).name}"
        return f"{COLLECTIVES[code]}(count={cnt}{kind}) at {where}"

    others = keys.count(ref) - 1
    comm.call = None
    raise CollectiveMismatchError(
        f"--debug: collective #{comm.seq} does not match across ranks: "
        + "; ".join(f"rank {r} calls {show(r)}" for r in odd[:4])
        + ("; ..." if len(odd) > 4 else "")
        + f"; but rank {first}{f' (and {others} more)' if others else ''} calls {show(first)}"
    )
