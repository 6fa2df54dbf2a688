"""Staging CuPy arrays through pinned host memory, for an MPI library that is not
CUDA-aware (one device->host copy before a collective, one host->device after)."""

from __future__ import annotations

import numpy as np


def sync_device() -> None:
    """Wait for the current CUDA stream: MPI may then read or write device memory."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()


class PinnedStage:
    """One pinned host buffer, allocated on first use and grown when a larger array
    comes; a staged view is valid until the next ``stage`` call."""

    def __init__(self):
        self._pinned = None  # (raw pinned memory, nbytes) reused for staging

    def stage(self, arr) -> np.ndarray:
        """A pinned host array with ``arr``'s values (one device->host copy)."""
        import cupy

        nbytes = arr.nbytes
        if self._pinned is None or self._pinned[1] < nbytes:
            self._pinned = (cupy.cuda.alloc_pinned_memory(max(nbytes, 1)), nbytes)
        host = np.frombuffer(self._pinned[0], dtype=arr.dtype, count=arr.size).reshape(arr.shape)
        arr.get(out=host)  # synchronous on the current stream
        return host

    @staticmethod
    def unstage(host: np.ndarray, arr) -> None:
        """``host``'s values back into the device array ``arr``."""
        arr.set(host)
        sync_device()  # the pinned buffer may be reused right after
