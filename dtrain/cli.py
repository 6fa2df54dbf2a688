"""Command line: `python -m dtrain [train|sample|evaluate|data|bench] ...`.

With no subcommand (or only flags), `python -m dtrain` trains.
"""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = ("train", "sample", "evaluate", "data", "bench")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="dtrain",
        description="Data-parallel training of the CS231n image-captioning RNN/LSTM "
        "(NumPy/CuPy + MPI). Run under mpirun/mpiexec/srun for several ranks.",
    )
    sub = parser.add_subparsers(dest="command")
    from .bench import add_bench_parser

    add_bench_parser(sub)
    try:
        from .datacli import add_data_parser

        add_data_parser(sub)
    except ImportError:
        pass
    try:
        from .trainer import add_train_parsers

        add_train_parsers(sub)
    except ImportError:
        pass
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0
