"""`dtrain train` (the default subcommand)."""

from __future__ import annotations

import os
import sys

from .. import signals
from ..config import add_config_flags, config_from_args
from ..loop import Trainer
from ..parallel.comm import Communicator, run_guarded


def add_parser(sub):
    p = sub.add_parser("train", help="train (the default subcommand)",
                       description="Train the captioner data-parallel; run under "
                                   "mpirun/mpiexec/srun for several ranks.")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args):
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    with signals.mpi_init():  # MPI_Init must not take SIGUSR1 or SIGHUP from us
        comm = Communicator()
    code = run_guarded(comm, lambda: Trainer(cfg, comm).train())
    if signals.orphaned():  # no launcher to finalize MPI with: MPI_Finalize could hang
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return code
