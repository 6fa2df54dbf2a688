"""`dtrain bench`: the command line of the benchmark (see ``dtrain.bench``)."""

from __future__ import annotations

import argparse

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

Comparisons run every contender in a process of its own, never two at once,
alternating for --rounds rounds of --steps steps, and print each one's median
of round medians and the ratio: --compare-torch (the same model in PyTorch; on
a CPU two processes kept alive alternate blocks, each checked idle while the
other runs), --compare-trainer (`dtrain train`'s logged ms/step) and
--strong-scaling P (1 rank x C threads against P ranks x C/P threads at the
same global batch). Every timing reports how much of the machine other
processes used meanwhile, and warns when that was over 5%.
"""


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time training steps (and compare with PyTorch)",
                              description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", "-N", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--data", default=None,
                   help="COCO-layout data directory (default: the trainer's built-in data set)")
    p.add_argument("--synthetic", action="store_true",
                   help="time one fixed synthetic batch (COCO-like lengths) instead of the data")
    p.add_argument("--seq-len", "-T", type=int, default=None,
                   help="target slots per caption, synthetic (16; implies --synthetic)")
    p.add_argument("--input-dim", "-D", type=int, default=None, help="feature width, synthetic (512; "
                   "implies --synthetic)")
    p.add_argument("--wordvec-dim", "-W", type=int, default=256)
    p.add_argument("--hidden-dim", "-H", type=int, default=512)
    p.add_argument("--vocab-size", "-V", type=int, default=None,
                   help="vocabulary, synthetic (1004; implies --synthetic)")
    p.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20; per round in a comparison)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank (default: cores / ranks on the node)")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    p.add_argument("--no-kernels", action="store_true", help="plain xp code instead of fused kernels")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the GEMM floor and the breakdown of the step (one CPU rank)")
    p.add_argument("--compare-torch", action="store_true",
                   help="time PyTorch too, each framework in its own process, alternating --rounds")
    p.add_argument("--compare-trainer", action="store_true",
                   help="time `dtrain train` too (its logged ms/step), alternating --rounds")
    p.add_argument("--strong-scaling", type=int, default=None, metavar="P",
                   help="same global batch: 1 rank x C threads against P ranks x C/P threads")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds of a comparison (default 6)")
    p.add_argument("--fresh-processes", action="store_true",
                   help="--compare-torch on a CPU: a new process per framework and round, instead of two "
                        "processes kept alive that alternate blocks of --steps steps")
    p.add_argument("--embed-reduce", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per micro-shard (gradient accumulation), as for train")
    p.add_argument("--deterministic", action="store_true",
                   help="fixed-point, world-size independent reduction (as train --deterministic)")
    p.add_argument("--ranks", type=int, default=None,
                   help="relaunch under the mpiexec beside this Python with P ranks")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    # one contender of a comparison, in a process of its own (started by the comparison)
    p.add_argument("--framework", choices=["dtrain", "torch"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # timed blocks on request
    p.set_defaults(func=_run)
    return p


def _run(args):
    return run_bench(args)
