"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Everything numeric in dtrain is written once against an array module ``xp``.
This module picks it, binds a rank to a device, moves arrays between the
host and that device, and sets (and reports) the CPU threads of a rank.
"""

from __future__ import annotations

import os

import numpy as np

from .cores import usable_cores


class DeviceError(RuntimeError):
    """A requested device cannot be used (one-line message for the CLI)."""

    user_error = True


def get_array_module(*arrays):
    """The array module (numpy or cupy) that owns ``arrays``."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    try:
        import cupy

        return cupy.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_device(device: str) -> str:
    """Map 'cpu' | 'gpu' | 'auto' to 'cpu' or 'gpu', or raise DeviceError."""
    if device not in ("cpu", "gpu", "auto"):
        raise DeviceError(f"--device: expected cpu, gpu or auto, got {device!r}")
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "gpu"
    if device == "auto":
        return "cpu"
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError or a broken CUDA install
        raise DeviceError(
            f"--device gpu: CuPy cannot be imported ({exc.__class__.__name__}: {exc}); "
            "install the gpu extra: pip install 'dtrain[gpu]'"
        ) from None
    raise DeviceError("--device gpu: CuPy imports but no CUDA device is available on this node")


def device_for_rank(local_rank: int, device_count: int) -> int:
    """The GPU of the rank with node-local rank ``local_rank`` among ``device_count``.

    Local rank modulo the count: 8 ranks on an 8-GPU node get one GPU each, 3 ranks
    on 2 GPUs get 0, 1, 0 (no GPU carries two ranks more than another), and with
    one visible device (a launcher that sets CUDA_VISIBLE_DEVICES per rank) every
    rank uses device 0.
    """
    if device_count < 1:
        raise DeviceError("--device gpu: no CUDA device is visible to this rank "
                          "(check CUDA_VISIBLE_DEVICES)")
    if local_rank < 0:
        raise ValueError(f"local rank: expected >= 0, got {local_rank}")
    return local_rank % device_count


def select(device: str, local_rank: int = 0):
    """Return the array module for ``device`` ('cpu' or 'gpu'), binding this
    rank's GPU (``device_for_rank``)."""
    if device == "cpu":
        return np
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device_for_rank(local_rank, count)).use()
    return cupy


def to_host(a) -> np.ndarray:
    """A NumPy array with the values of ``a`` (no copy when already on the host)."""
    if isinstance(a, np.ndarray):
        return a
    return a.get()


def to_device(a, xp):
    """``a`` as an array of module ``xp`` (no copy when already there)."""
    if xp is np:
        return to_host(a)
    return xp.asarray(a)


def node_threads(local_size: int, requested=None) -> int:
    """BLAS/kernel threads for this rank: ``requested`` (--threads-per-rank), else
    Slurm's cpus-per-task, else this rank's usable cores divided among the
    ``local_size`` ranks of its node."""
    if requested:
        return int(requested)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    usable, bound = usable_cores()
    if bound:  # the launcher already bound this rank to its own cores
        return max(1, usable)
    return max(1, usable // max(1, local_size))


def set_threads(n: int, ranks_on_node: int = 1) -> None:
    """BLAS threads (threadpoolctl) and fused-kernel threads of this process (one of
    ``ranks_on_node`` ranks on this machine)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except Exception:
        pass
    from . import kernels

    kernels.set_num_threads(n, ranks_on_node)


def blas_info() -> dict:
    """Which BLAS runs, with which kernel (e.g. OpenBLAS SkylakeX) and how many threads."""
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return {"library": info.get("internal_api"), "kernel": info.get("architecture"),
                        "threads": info.get("num_threads"), "version": info.get("version")}
    except Exception:
        pass
    return {"library": "unknown", "kernel": "unknown", "threads": None}
