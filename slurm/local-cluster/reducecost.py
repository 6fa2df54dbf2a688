#!/usr/bin/env python3
"""The reduction alone, at the CS231n sizes: one MPI job, run by linkcost.py --reduce-only.

Every rank holds a gradient of the CS231n LSTM's layout (H=512, W=256, V=1004, 512 input
features: 2,352,620 dense floats and the (V, W) embedding) with ``--rows`` distinct words
in its batch, and times dtrain's own reducer (``make_reducer``: the Allgather of row
counts, the dense Allreduce and the embedding's sparse Allgatherv or dense Allreduce) after
a barrier, ``--repeat`` times. Rank 0 prints one JSON line: the median, the 10th and 90th
percentiles (ms) of the slowest rank's time, bytes per rank and the embedding mode.
Without compute in the way the reduction's time depends on the link and the ranks, far
less on the machine's load than a training step's: this is what linkcost.py fits.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dtrain.nn.model import PARAM_ORDER, StepGrads, param_shapes
from dtrain.parallel.comm import Communicator, run_guarded
from dtrain.parallel.reducer import make_reducer

V, W, H, D = 1004, 256, 512, 512


def grads_for(rank: int, rows: int):
    shapes = param_shapes(V, D, W, H, "lstm")
    total = sum(int(np.prod(shapes[n])) for n in PARAM_ORDER)
    offset = total - V * W
    rng = np.random.default_rng(rank)
    buf = np.zeros(total, np.float32)
    buf[:offset] = rng.standard_normal(offset)
    ids = np.sort(rng.choice(V, size=rows, replace=False)).astype(np.int64)
    emb = rng.standard_normal((rows, W)).astype(np.float32)
    return StepGrads(loss=1.0, tokens=100, grad_buffer=buf, embed_offset=offset,
                     embed_shape=(V, W), embed_ids=ids, embed_rows=emb, embed_dense=False)


def main(comm, opts):
    grads = grads_for(comm.rank, opts.rows)
    reducer = make_reducer(comm, opts.embed_reduce, 1, opts.reduce_dtype)
    times, res = [], None
    for i in range(opts.warmup + opts.repeat):
        comm.barrier()
        t0 = time.perf_counter()
        res = reducer.reduce(grads, grads.loss, grads.tokens, False)
        dt = time.perf_counter() - t0
        slowest = comm.allreduce_scalars([0.0] * comm.rank + [dt]
                                         + [0.0] * (comm.size - comm.rank - 1))
        if i >= opts.warmup:
            times.append(float(slowest.max()))
    if comm.is_root:
        ms = np.array(times) * 1e3
        print(json.dumps({"ranks": comm.size, "reduce_ms": float(np.median(ms)),
                          "p10_ms": float(np.percentile(ms, 10)),
                          "p90_ms": float(np.percentile(ms, 90)), "bytes": res.bytes,
                          "embed": res.mode, "reduce_dtype": opts.reduce_dtype,
                          "repeat": opts.repeat}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=232, help="distinct words in a rank's batch")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--embed-reduce", default="auto")
    p.add_argument("--reduce-dtype", default="fp32")
    opts = p.parse_args()
    comm = Communicator()
    run_guarded(comm, main, comm, opts)
