"""`dtrain bench`: the command line of the benchmark (see ``dtrain.bench``)."""

from __future__ import annotations

import argparse

from ..bench import run_bench
from ..nn.cells import CELLS

BENCH_DOC = '`python -m dtrain bench`: time full training steps (forward, backward, Adam).\n\nPrints the median step time, tokens/s (real, unmasked tokens), achieved\nGFLOP/s (the GEMM work the step really does), and which BLAS library, kernel\nand thread count ran. With --compare-torch it times the same model in PyTorch\nin the same run, interleaving the two step by step so both see the same\nmachine load, and prints the ratio. Under mpiexec (or with --ranks P, which\nrelaunches itself under the mpiexec beside this Python) it also reports the\ncommunication time and bytes of the gradient reduction, dense and sparse.\n'


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time training steps (and compare with PyTorch)",
                              description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", "-N", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--seq-len", "-T", type=int, default=16, help="target slots per caption (16)")
    p.add_argument("--input-dim", "-D", type=int, default=512)
    p.add_argument("--wordvec-dim", "-W", type=int, default=256)
    p.add_argument("--hidden-dim", "-H", type=int, default=512)
    p.add_argument("--vocab-size", "-V", type=int, default=1004)
    p.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank (default: cores / ranks on the node)")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default="cpu")
    p.add_argument("--no-kernels", action="store_true", help="plain xp code instead of fused kernels")
    p.add_argument("--compare-torch", action="store_true", help="time PyTorch too, interleaved")
    p.add_argument("--embed-reduce", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per micro-shard (gradient accumulation), as for train")
    p.add_argument("--deterministic", action="store_true",
                   help="fixed-point, world-size independent reduction (as train --deterministic)")
    p.add_argument("--ranks", type=int, default=None,
                   help="relaunch under the mpiexec beside this Python with P ranks")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
    return p


def _run(args):
    return run_bench(args)
