"""Command line: `python -m dtrain [train|sample|evaluate|data|bench] ...`.

With no subcommand (or only flags), `python -m dtrain` trains. A missing or
broken dependency (NumPy, h5py, mpi4py, Numba, ...) is reported in one line
naming it, never as a subcommand that silently disappears.
"""

from __future__ import annotations

import argparse
import sys

from . import signals

SUBCOMMANDS = ("train", "sample", "evaluate", "score", "data", "bench")


def build_parser():
    from .commands import add_all

    parser = argparse.ArgumentParser(
        prog="dtrain",
        description="Data-parallel training of the CS231n image-captioning RNN/LSTM/GRU "
        "(NumPy/CuPy + MPI). Run under mpirun/mpiexec/srun for several ranks.",
    )
    add_all(parser.add_subparsers(dest="command"))
    return parser


def _failed_module(exc: ImportError) -> str:
    """The top-level package that failed to import: the missing one, or the outermost
    non-dtrain module whose own import raised (a broken install)."""
    if exc.name:
        return exc.name.split(".")[0]
    tb, culprit = exc.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if culprit is None and name and not name.startswith(("dtrain", "importlib", "__main__")):
            culprit = name
        tb = tb.tb_next
    return (culprit or "unknown").split(".")[0]


def _dependency_error(exc: ImportError) -> str:
    top = _failed_module(exc)
    return (f"dtrain: error: a dependency cannot be imported: {top} ({type(exc).__name__}: {exc}); "
            f"reinstall it in this environment, e.g. `pip install -e .` or `pip install {top}`")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv
    if argv[0] == "train":  # before anything slow: a stop signal from now on is a checkpoint
        signals.install()
    else:  # `dtrain sample | head -1` is not an error either
        signals.guard_output()
    try:
        parser = build_parser()
    except ImportError as exc:
        print(_dependency_error(exc), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0
