"""The gathering collectives of the Communicator (a mixin): every rank's rows, small
vectors or byte strings, in rank order.

The mixin holds no state: it uses the Communicator's ``comm``, ``MPI``, ``rank``,
``size`` and its ``_enter``/``_leave`` call bookkeeping (parallel/comm.py).
"""

from __future__ import annotations

import numpy as np

from .mpi_load import is_cupy

_GATHER_TAG = 7001  # the point-to-point messages of gather_bytes


class GatherMixin:
    """``allgatherv``, ``allgatherv_rows``, ``allgather_scalars`` and ``gather_bytes``."""

    def allgatherv(self, arr) -> np.ndarray:
        """Every rank's ``arr`` concatenated along axis 0, in rank order (a numpy array).

        Row counts may differ per rank; trailing shape and dtype must agree
        (checked: a mismatch raises the same ValueError on every rank).
        CuPy input is gathered through the host.
        """
        if is_cupy(arr):
            arr = arr.get()
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 0:
            raise ValueError("allgatherv: expected an array with at least one axis")
        if self.size == 1:
            return arr.copy()
        # count: the elements of one row, which every rank must agree on
        self._enter("allgatherv", int(np.prod(arr.shape[1:], dtype=np.int64)), arr.dtype,
                    arr.nbytes)
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
            self.comm.Send([np.frombuffer(bytes(payload), dtype=np.uint8), self.MPI.BYTE],
                           dest=root, tag=_GATHER_TAG)
        self._leave()
        return parts
