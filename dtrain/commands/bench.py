"""`dtrain bench`: the command line of the benchmark (see ``dtrain.bench``)."""

from __future__ import annotations

import argparse
import sys

from ..bench import run_bench
from ..nn.cells import CELLS

BENCH_DOC = """`python -m dtrain bench`: time the trainer's training step.

Each timed step is one iteration of the trainer: the batch assembled from the
data by the sampler (the built-in data set unless --data), packing, forward,
backward, the gradient reduce and Adam. It prints the median step time,
tokens/s (real, unmasked tokens), achieved GFLOP/s (the GEMM work the step
really does), and which BLAS library, kernel and thread count ran; on one CPU
rank also the step's GEMM floor (its GEMMs alone, replayed) and where the
rest of the step goes. Under mpiexec (or with --ranks P, which relaunches
itself under the mpiexec beside this Python) it also reports the
communication time and bytes of the gradient reduction.

Comparisons, each contender in a process of its own, alternating, live in the
repository's benchmarks/ (benchmarks/README.md): python -m
benchmarks.compare_torch (PyTorch), benchmarks.compare_trainer (`dtrain
train`'s logged ms/step) and benchmarks.strong_scaling (1 rank against P).
"""

# Flags that moved to the tooling in benchmarks/: each names its new command.
MOVED = {"compare_torch": ("--compare-torch", "compare_torch"),
         "compare_trainer": ("--compare-trainer", "compare_trainer"),
         "strong_scaling": ("--strong-scaling", "strong_scaling"),
         "rounds": ("--rounds", "compare_torch"),
         "fresh_processes": ("--fresh-processes", "compare_torch")}


def add_workload_arguments(p):
    """The flags that say what is timed and how; shared with the comparisons in benchmarks/."""
    p.add_argument("--batch-size", "-N", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--data", default=None,
                   help="COCO-layout data directory (default: the trainer's built-in data set)")
    p.add_argument("--synthetic", action="store_true",
                   help="time one fixed synthetic batch (COCO-like lengths) instead of the data")
    p.add_argument("--seq-len", "-T", type=int, default=None,
                   help="target slots per caption, synthetic (16; implies --synthetic)")
    p.add_argument("--input-dim", "-D", type=int, default=None, help="feature width, synthetic "
                   "(512; implies --synthetic)")
    p.add_argument("--wordvec-dim", "-W", type=int, default=256)
    p.add_argument("--hidden-dim", "-H", type=int, default=512)
    p.add_argument("--vocab-size", "-V", type=int, default=None,
                   help="vocabulary, synthetic (1004; implies --synthetic)")
    p.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="GEMM operands: fp32 (default) or bf16 (float32 sums; CPU with AMX-BF16, "
                        "the extra bf16)")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps (default 20; per round in a comparison)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank (default: cores / ranks on the node)")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    p.add_argument("--no-kernels", action="store_true",
                   help="plain xp code instead of fused kernels")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the GEMM floor and the breakdown of the step (one CPU rank)")
    p.add_argument("--embed-reduce", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per micro-shard (gradient accumulation), as for train")
    p.add_argument("--deterministic", action="store_true",
                   help="fixed-point, world-size independent reduction (as train --deterministic)")
    p.add_argument("--ranks", type=int, default=None,
                   help="relaunch under the mpiexec beside this Python with P ranks")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    return p


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time training steps",
                              description=BENCH_DOC,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(p)
    for dest, (flag, _) in MOVED.items():  # kept only to say where they went
        p.add_argument(flag, dest=dest, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)
    return p


def moved_flag_error(args):
    """One line naming the benchmarks/ command that replaced a moved flag, or None."""
    for dest, (flag, module) in MOVED.items():
        if getattr(args, dest, None) is not None:
            return (f"dtrain: error: bench {flag}: comparisons moved out of dtrain; run "
                    f"`python -m benchmarks.{module}` from the repository root "
                    f"(see benchmarks/README.md)")
    return None


def _run(args):
    moved = moved_flag_error(args)
    if moved:
        print(moved, file=sys.stderr)
        return 2
    return run_bench(args)
