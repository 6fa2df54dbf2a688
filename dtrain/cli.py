"""Command line: `python -m dtrain [train|sample|evaluate|score|data|bench] ...`.

With no subcommand (or only flags), `python -m dtrain` trains. A missing or
broken dependency (NumPy, h5py, mpi4py, Numba, ...) is reported in one line
naming it, never as a subcommand that silently disappears.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import signals

SUBCOMMANDS = ("train", "sample", "evaluate", "score", "data", "bench")

# Every numeric flag of every subcommand, with the range it accepts: (lowest, highest), both
# included; a float flag must also be finite, and (0.0, None) means > 0. Checked before any work
# (check_numbers), so that no value fails late (after training) or as a MemoryError.
# tests/test_config_validation.py walks the whole parser: a numeric flag missing here fails it.
COUNT = 2**62  # counts and steps: what the checkpoint's int64 fields hold
SEED = 2**63 - 1
WIDTH = 1 << 16  # a model or feature dimension
LENGTH = 4096  # caption time steps
THREADS = 1024
LIMITS = {
    "train": {"--max-train": (1, COUNT), "--feature-memory-budget-mb": (0, 1 << 40),
              "--wordvec-dim": (1, WIDTH), "--hidden-dim": (1, WIDTH), "--batch-size": (1, 1 << 24),
              "--lr": (0.0, None), "--lr-decay": (0.0, None), "--epochs": (0.0, None),
              "--steps": (0, COUNT), "--seed": (0, SEED), "--eval-every": (0, COUNT),
              "--eval-images": (0, COUNT), "--eval-captions": (0, COUNT), "--log-every": (1, COUNT),
              "--max-length": (1, LENGTH), "--checkpoint-every": (0, COUNT),
              "--keep-checkpoints": (1, COUNT), "--threads-per-rank": (1, THREADS),
              "--micro-batch": (1, 1 << 24), "--buckets": (1, 1 << 16), "--check-every": (0, COUNT),
              "--stall-timeout": (0.0, 1e9)},
    "sample": {"--max-length": (1, LENGTH), "--threads-per-rank": (1, THREADS),
               "--beam-size": (1, 1 << 16), "--length-penalty": (0.0, 1e6), "--num": (1, COUNT)},
    "evaluate": {"--max-length": (1, LENGTH), "--threads-per-rank": (1, THREADS),
                 "--beam-size": (1, 1 << 16), "--length-penalty": (0.0, 1e6),
                 "--eval-images": (0, COUNT), "--eval-captions": (0, COUNT)},
    "data synth": {"--train-images": (1, 1 << 30), "--val-images": (1, 1 << 30),
                   "--seed": (0, SEED)},
    "data import-coco": {"--min-count": (0, COUNT), "--max-words": (1, LENGTH - 2)},
    "data check": {"--max-train": (1, COUNT)},
    "bench": {"--batch-size": (1, 1 << 20), "--seq-len": (1, LENGTH), "--input-dim": (1, WIDTH),
              "--wordvec-dim": (1, WIDTH), "--hidden-dim": (1, WIDTH), "--vocab-size": (5, 1 << 24),
              "--steps": (1, COUNT), "--warmup": (0, COUNT),
              "--threads": (1, THREADS), "--micro-batch": (1, 1 << 20), "--ranks": (1, THREADS),
              "--seed": (0, SEED)},
}


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


def numeric_flags(parser, path=()):
    """{(command path, option string): action} of every int or float flag, walking subparsers.
    The option string is the longest one (``-n``/``--num``: ``--num``)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(numeric_flags(sub, (*path, name)))
        elif action.option_strings and action.type in (int, float):
            out[(" ".join(path), max(action.option_strings, key=len))] = action
    return out


def _in_range(value, low, high, kind) -> bool:
    if kind is float and not math.isfinite(value):
        return False
    above = value > low if (kind is float and low == 0.0 and high is None) else value >= low
    return above and (high is None or value <= high)


def _expected(low, high, kind) -> str:
    if kind is float:
        low_text = f"> {low:g}" if low == 0.0 and high is None else f">= {low:g}"
        return f"a finite number {low_text}" + (f" and <= {high:g}" if high is not None else "")
    return (f"an integer in [{low}, {high}]" if high is not None
            else "a positive integer" if low == 1 else f"an integer >= {low}")


def check_numbers(parser, args) -> str | None:
    """The one-line error for the first numeric flag out of its LIMITS range, else None."""
    path = args.command + (f" {args.data_command}" if args.command == "data" else "")
    for (where, flag), action in numeric_flags(parser).items():
        value = getattr(args, action.dest, None)
        if where != path or value is None:
            continue
        low, high = LIMITS[where][flag]
        if not _in_range(value, low, high, action.type):
            named = "/".join(action.option_strings)  # -N/--batch-size: as the user may type it
            return f"{named}: expected {_expected(low, high, action.type)}, got {value!r}"
    return None


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
    bad = check_numbers(parser, args)
    if bad is not None:
        print(f"dtrain: error: {bad}", file=sys.stderr)
        return 2
    return args.func(args) or 0
