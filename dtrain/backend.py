"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

Everything numeric in dtrain is written once against an array module ``xp``.
This module picks it, binds a rank to a device, and moves arrays between the
host and that device.
"""

from __future__ import annotations

import numpy as np


class DeviceError(RuntimeError):
    """A requested device cannot be used (one-line message for the CLI)."""


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


def select(device: str, local_rank: int = 0):
    """Return the array module for ``device`` ('cpu' or 'gpu'), binding a GPU.

    A rank's GPU is its local rank modulo the node's device count, so 8 ranks
    on an 8-GPU node get one GPU each and 2 ranks on one GPU share it.
    """
    if device == "cpu":
        return np
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(local_rank % count).use()
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
