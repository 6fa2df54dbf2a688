"""The one reader of dtrain's environment variables (``DTRAIN_*``).

Every ``DTRAIN_*`` variable is declared here, with its meaning, and read through
:func:`get` or :func:`flag`; no other module looks them up in ``os.environ``. The table
in docs/environment.md is this list. This module imports nothing of dtrain, so any
module (kernels included) may use it without an import cycle.

Variables of other programs (``SLURM_*``, ``PMI_*``, ``NUMBA_*``, ``OMPI_*``) describe
the launcher or a library and are read where they are used.
"""

from __future__ import annotations

import os

# name -> what it does (docs/environment.md renders this table)
VARIABLES = {
    "DTRAIN_CACHE": "directory of the built-in data set (default ~/.cache/dtrain)",
    "DTRAIN_NO_KERNELS": "any non-empty value: run the plain xp reference code, no fused kernels",
    "DTRAIN_BLAS_POOL": "'openblas': keep OpenBLAS's own threads, not the shared Numba pool",
    "DTRAIN_NO_GRAPHS": "any non-empty value: run the GPU step eagerly, without CUDA graphs",
    "DTRAIN_STALL_TIMEOUT": "seconds, the default of --stall-timeout (a flag given wins)",
    "DTRAIN_TRACE": "path, the default of --trace (a flag given wins)",
    "DTRAIN_FAULT": "tests only: inject a fault (see dtrain/testhooks.py)",
    "DTRAIN_DUMP_DIR": "tests only: directory where ranks dump their final state",
}


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value, or ``default`` when unset or empty."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not one of dtrain's environment variables (dtrain/env.py)")
    return os.environ.get(name) or default


def flag(name: str) -> bool:
    """True when the variable is set to a non-empty value."""
    return bool(get(name))
