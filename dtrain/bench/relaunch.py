"""``dtrain bench`` started again with the same flags: under mpiexec (--ranks), or as a child.

Every flag's dest is its long name, so ``bench_flags(args)`` turns a parsed
namespace back into the command line that parses to it (the tooling in
benchmarks/ builds its child processes' command lines the same way).
"""

from __future__ import annotations

import os
import sys


def bench_flags(args, drop=()):
    """``bench`` flags that reproduce ``args``, leaving out the dests in ``drop``."""
    out = []
    for key, value in sorted(vars(args).items()):
        if key in drop or key in ("command", "func") or value is None or value is False \
                or callable(value):
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def mpiexec():
    """The mpiexec installed beside this Python (the MPICH wheel's), whatever is on PATH."""
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def launch(ranks, argv, module="dtrain"):
    """The command that runs ``python -m module argv``, under mpiexec when ``ranks`` > 1."""
    base = [sys.executable, "-m", module, *argv]
    return [mpiexec(), "-n", str(ranks), *base] if ranks and ranks > 1 else base
