"""`python -m dtrain bench`: time full training steps (forward, backward, reduce, Adam).

Prints the median step time, tokens/s (real, unmasked tokens), achieved
GFLOP/s (the GEMM work the step really does), and which BLAS library, kernel
and thread count ran. The timed step is the trainer's own ``TrainStep``
(packing the captions, forward, backward, the gradient reducer, Adam) on a
fixed synthetic batch. With --compare-torch it times the same model in
PyTorch in the same run, interleaving the two step by step, and prints the
ratio. Under mpiexec (or with --ranks P, which relaunches itself under the
mpiexec beside this Python) it also reports the communication time and bytes
of the gradient reduction.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from .. import backend
from ..kernels import for_arrays
from ..nn.cells import get_cell
from ..nn.model import CaptioningModel, pack_captions
from ..nn.optim import Adam
from ..parallel.comm import Communicator
from ..parallel.reducer import make_reducer
from ..step import TrainStep
from .workload import step_flops, synthetic_batch, vocab


def _relaunch(args):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    argv = list(sys.argv[1:])
    i = argv.index("--ranks")
    del argv[i : i + 2]
    return subprocess.call([mpiexec, "-n", str(args.ranks), sys.executable, "-m", "dtrain"] + argv)


def _under_mpi():
    return any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMI_SIZE"))


def run_bench(args):
    if args.ranks and not _under_mpi():
        return _relaunch(args)
    comm = Communicator()
    try:
        device = backend.resolve_device(args.device)
    except backend.DeviceError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    if args.batch_size % comm.size:
        print(f"dtrain: error: --batch-size {args.batch_size} is not divisible by {comm.size} ranks",
              file=sys.stderr)
        return 2
    xp = backend.select(device, comm.local_rank)
    threads = backend.node_threads(comm.local_size, args.threads)
    backend.set_threads(threads)
    shard = args.batch_size // comm.size
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    features, captions = synthetic_batch(args.batch_size, args.seq_len, args.vocab_size, args.input_dim, rng)
    lo, hi = comm.rank * shard, (comm.rank + 1) * shard
    my_feats, my_caps = features[lo:hi], captions[lo:hi]
    model = CaptioningModel(vocab(args.vocab_size), args.input_dim, args.wordvec_dim, args.hidden_dim,
                            args.cell, dtype=dtype, seed=args.seed, xp=xp, use_kernels=not args.no_kernels)
    adam = Adam(model.num_params, xp=xp, dtype=dtype,
                kernels=None if args.no_kernels else for_arrays(xp, dtype))
    micro = args.micro_batch or (math.gcd(args.batch_size, 8) if args.deterministic else None)
    if micro and (args.batch_size % micro or (args.batch_size // micro) % comm.size):
        print(f"dtrain: error: --micro-batch {micro}: {comm.size} ranks must divide the "
              f"--batch-size {args.batch_size} / {micro} micro-shards", file=sys.stderr)
        return 2
    reducer = make_reducer(comm, args.embed_reduce, deterministic=args.deterministic,
                           segments=model.segments, total_micro=args.batch_size // micro if micro else 1,
                           kernels=model.kernels)
    step_micro = micro if micro and micro < shard else None
    real_tokens = int((captions[:, 1:] != 0).sum())
    flops = step_flops(pack_captions(captions, 0), args.batch_size, args.input_dim, args.wordvec_dim,
                       args.hidden_dim, args.vocab_size, get_cell(args.cell).gates)
    torch_step = torch_version = None
    if args.compare_torch:
        if comm.size > 1:
            print("dtrain: error: --compare-torch times one process; run it without --ranks", file=sys.stderr)
            return 2
        try:
            from .torch_ref import torch_step_factory

            torch_step, torch_version = torch_step_factory(args, threads, features, captions,
                                                           device="cuda" if device == "gpu" else "cpu")
        except ImportError:
            print("dtrain: error: --compare-torch: PyTorch is not importable; `pip install torch==2.13.0` "
                  "(CPU build) to compare", file=sys.stderr)
            return 2
    if device == "gpu":
        from .gpu import print_gpu_lines, run_gpu_bench

        result = run_gpu_bench(args, comm, model, adam, reducer, my_feats, my_caps, real_tokens, flops,
                               torch_step, torch_version)
    else:
        result = _run_cpu(args, comm, model, adam, reducer, my_feats, my_caps, real_tokens, flops,
                          torch_step, torch_version, step_micro)
        result["threads_per_rank"] = threads
        result["blas"] = backend.blas_info()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result.update({"peak_rss_mb": float(comm.allreduce_scalars(np.array([peak]))[0]) / comm.size,
                   "deterministic": bool(args.deterministic), "micro_batch": micro})
    result.update({"cell": args.cell, "dtype": args.dtype, "N": args.batch_size, "T": args.seq_len,
                   "D": args.input_dim, "W": args.wordvec_dim, "H": args.hidden_dim, "V": args.vocab_size,
                   "ranks": comm.size, "real_token_fraction": real_tokens / (args.batch_size * args.seq_len)})
    if comm.is_root:
        print_result(result)
        if device == "gpu":
            print_gpu_lines(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


def _run_cpu(args, comm, model, adam, reducer, feats, caps, real_tokens, flops, torch_step, torch_version,
             micro_batch=None):
    step = TrainStep(model, adam, reducer, micro_batch=micro_batch)
    B = args.batch_size
    for _ in range(args.warmup):
        step(feats, caps, B, 1e-3)
        if torch_step:
            torch_step()
    times, comm_times, torch_times, modes, nbytes = [], [], [], [], []
    for _ in range(args.steps):
        if comm.size > 1:
            comm.barrier()
        r = step(feats, caps, B, 1e-3)
        times.append(r.seconds)
        comm_times.append(r.comm_s)
        modes.append(r.mode)
        nbytes.append(r.bytes)
        if torch_step:
            t0 = time.perf_counter()
            torch_step()
            torch_times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    result = {"device": "cpu", "kernels": model.kernels.name if model.kernels is not None else "plain xp",
              "median_ms": med * 1e3, "tokens_per_s": real_tokens / med, "gflops": flops / med / 1e9}
    result["bytes_per_step"] = int(statistics.median(nbytes))
    result["reduce_mode"] = max(set(modes), key=modes.count)
    if comm.size > 1:
        comm_med = float(comm.allreduce_scalars(np.array([statistics.median(comm_times)]))[0]) / comm.size
        result.update({"comm_ms": comm_med * 1e3, "compute_ms": (med - statistics.median(comm_times)) * 1e3,
                       "comm_share": comm_med / med, "embed_reduce": max(set(modes), key=modes.count),
                       "bytes_per_step": int(statistics.median(nbytes))})
    if torch_times:
        tmed = statistics.median(torch_times)
        result.update({"torch_version": torch_version, "torch_median_ms": tmed * 1e3,
                       "torch_tokens_per_s": real_tokens / tmed, "speedup_vs_torch": tmed / med})
    return result


def print_result(r):
    b = r["blas"]
    print(f"dtrain bench: {r['cell']} {r['dtype']} N={r['N']} T={r['T']} D={r['D']} W={r['W']} "
          f"H={r['H']} V={r['V']} ranks={r['ranks']} device={r['device']}")
    print(f"  BLAS: {b.get('library')} {b.get('version', '')} kernel={b.get('kernel')} "
          f"threads={b.get('threads')}; fused kernels: {r['kernels']}")
    print(f"  real tokens: {100 * r['real_token_fraction']:.1f}% of target slots; peak memory "
          f"{r['peak_rss_mb']:.0f} MB per rank; micro-batch {r['micro_batch'] or 'none'}"
          f"{', deterministic' if r['deterministic'] else ''}")
    print(f"  dtrain : {r['median_ms']:8.1f} ms/step  {r['tokens_per_s']:9.0f} tokens/s  "
          f"{r['gflops']:6.1f} GFLOP/s")
    if "comm_ms" in r:
        print(f"  comm   : {r['comm_ms']:8.2f} ms/step ({100 * r['comm_share']:.1f}% of the step), "
              f"compute {r['compute_ms']:.1f} ms, embedding reduce {r['embed_reduce']}, "
              f"{r['bytes_per_step'] / 1e6:.2f} MB/step per rank")
    elif r.get("reduce_mode"):
        print(f"  reduce : {r['reduce_mode']}, {r.get('bytes_per_step', 0) / 1e6:.2f} MB/step per rank")
    if "torch_median_ms" in r:
        print(f"  PyTorch {r['torch_version']}: {r['torch_median_ms']:8.1f} ms/step  "
              f"{r['torch_tokens_per_s']:9.0f} tokens/s")
        print(f"  dtrain / PyTorch tokens/s: {r['speedup_vs_torch']:.2f}x")
