"""The OpenBLAS libraries loaded in this process, for what NumPy does not call itself.

NumPy's wheels ship OpenBLAS with prefixed, suffixed symbol names
(``scipy_cblas_somatcopy64_``); other builds use the plain names. ``Library``
finds an entry point under any of them. Used for the threads callback
(``pool.py``), the out-of-place transpose (``cblas_somatcopy``, called from
``cpu/blas.py``; the same bits as NumPy's transposing copy), and the GEMM that adds
its product to its output (``cblas_sgemm`` with beta = 1, which NumPy's matmul cannot
ask for).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


class Library:
    """One OpenBLAS shared library and the naming of its symbols."""

    def __init__(self, path: str, version: str | None = None):
        self.path, self.version = path, version
        self.lib = ctypes.CDLL(path)
        config = self.symbol("openblas_get_config")
        if config is not None:
            config.restype = ctypes.c_char_p
            self.config = (config() or b"").decode(errors="replace")
        else:
            self.config = ""
        # BLAS integers: 64 bits in the ILP64 builds NumPy ships
        self.blasint = ctypes.c_int64 if "USE64BITINT" in self.config else ctypes.c_int32

    def symbol(self, name: str):
        """The entry point ``name`` (e.g. "cblas_somatcopy") under this build's naming, or None."""
        for candidate in (f"scipy_{name}64_", f"scipy_{name}", f"{name}64_", f"{name}_64", name):
            fn = getattr(self.lib, candidate, None)
            if fn is not None:
                return fn
        return None


def loaded() -> list[Library]:
    """Every OpenBLAS loaded in this process (NumPy's first), via threadpoolctl."""
    from threadpoolctl import threadpool_info

    infos = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    infos.sort(key=lambda i: not os.path.realpath(i["filepath"]).startswith(numpy_dir))
    return [Library(i["filepath"], i.get("version")) for i in infos]
