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

The class keeps the transport; its parts live beside it: mpi_load.py (loading
MPI, CUDA-awareness), staging.py (pinned host buffers), pending.py (the overlapped
sum), bf16_sum.py, gather.py (the gathering collectives, a mixin), agree.py
(--debug), consistency.py, layout.py (hosts) and failure.py (``run_guarded``);
the public names are re-exported here.

It is transport only: what to send (dense or sparse gradients) is the
reducer's business (``parallel/reducer.py``). The module knows nothing of the
model. A plain ``python -m dtrain`` (no
launcher) is an MPI singleton: a world of one, where every collective is a
local no-op.
"""

from __future__ import annotations

import json
import time

import numpy as np

from .agree import COLLECTIVES, CollectiveMismatchError, agree
from .bf16_sum import BF16_SUM_BOUND, allreduce_sum_bf16, bucket_bounds
from .consistency import DivergenceError, check_consistent
from .failure import abort_now, run_guarded
from .gather import GatherMixin
from .layout import describe_layout, gather_hosts
from .mpi_load import import_mpi, is_cupy, query_cuda_aware
from .pending import PendingSum
from .staging import PinnedStage, sync_device

__all__ = ["BF16_SUM_BOUND", "COLLECTIVES", "CollectiveMismatchError", "Communicator",
           "DivergenceError", "PendingSum", "describe_layout", "run_guarded"]

class Communicator(GatherMixin):
    """Data-parallel collectives over an MPI intracommunicator (default COMM_WORLD).

    Attributes: ``rank``, ``size``, ``local_rank``, ``local_size`` (from a
    shared-memory split: the ranks on this node), ``is_root`` (rank 0),
    ``cuda_aware`` (the MPI library takes CUDA device buffers).
    """

    def __init__(self, mpi_comm=None):
        MPI = import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self.local_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.local_comm.Get_rank()
        self.local_size = self.local_comm.Get_size()
        self.cuda_aware = query_cuda_aware(MPI)
        self._staging = PinnedStage()  # GPU arrays through the host, when not cuda_aware
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
        """--debug: every rank's call compared before it (parallel/agree.py)."""
        agree(self, op, count, dtype)

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
        if is_cupy(arr) and not self.cuda_aware:
            host = self._staging.stage(arr)
            self.comm.Bcast(host, root=root)
            self._staging.unstage(host, arr)
        else:
            if is_cupy(arr):
                sync_device()
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
        staged = is_cupy(buf) and not self.cuda_aware
        if staged:
            target = self._staging.stage(buf)
        else:
            if is_cupy(buf):
                sync_device()
            target = buf
        for lo, hi in bucket_bounds(buf.size, buckets):
            self.comm.Allreduce(MPI.IN_PLACE, target[lo:hi], op=MPI.SUM)
        if staged:
            self._staging.unstage(target, buf)
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
        if is_cupy(buf):
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
        """In-place SUM over ranks of a float32 1-D ``buf``, sent as bf16, summed in float32
        (how, and the bound: ``bf16_sum.allreduce_sum_bf16``)."""
        self._check_flat(buf, "allreduce_sum_bf16_")
        if np.dtype(buf.dtype) != np.float32:
            raise ValueError(f"allreduce_sum_bf16_: expected float32, got {buf.dtype}")
        if self.size == 1:
            return
        allreduce_sum_bf16(self, buf)

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

    def gather_hosts(self, threads: int) -> list[tuple[str, int, int, int]]:
        """(host name, local rank, ranks on that host, threads) of every rank, in rank order.

        A collective: every rank calls it. The local rank and size are the ones MPI
        gives (the shared-memory split), so this shows what each rank really uses.
        """
        return gather_hosts(self, threads)

    def describe_hosts(self, threads: int) -> str:
        """``describe_layout`` of ``gather_hosts(threads)``: a collective, on every rank."""
        return describe_layout(self.gather_hosts(threads))

    # -------------------------------------------------------------- consistency
    def check_consistent(self, array, what: str = "parameters") -> None:
        """Raise DivergenceError on every rank if ``array`` differs between ranks.

        Compares a float64 sum and a BLAKE2 hash of the bytes (Allgather).
        """
        check_consistent(self, array, what)

    # ------------------------------------------------------------------ failure
    def _abort_now(self, code: int):
        """End the job with exit status ``code`` (parallel/failure.py)."""
        abort_now(self, code)
