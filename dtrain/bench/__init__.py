"""`python -m dtrain bench`: time the trainer's training step, and what it is made of.

The timed step is what one iteration of ``Trainer.train`` does: the batch
assembled from the data by the sampler (the built-in data set unless --data;
--synthetic times one fixed synthetic batch instead), then the trainer's own
``TrainStep``: packing the captions, forward, backward, the gradient reducer,
Adam. It prints the median step time, tokens/s (real, unmasked tokens),
achieved GFLOP/s (the GEMM work the step really does) and which BLAS library,
kernel and thread count ran; on one CPU rank also the step's GEMM floor and
where the rest of the step goes (floor.py). Under mpiexec (or with --ranks P,
which relaunches itself under the mpiexec beside this Python) it reports the
communication time and bytes of the gradient reduction.

Comparisons with PyTorch, with ``dtrain train`` and across rank counts are
tooling, not product: they live in the repository's benchmarks/ and drive this
module's timer through ``run_step_bench(args, comm, drive)``.

Modules: batches.py (where batches come from), cpu.py and gpu.py (the timed
loops), floor.py (GEMM floor, breakdown), relaunch.py (the same flags again,
under mpiexec), report.py (printing), workload.py (synthetic batch, FLOP count).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np


def _under_mpi():
    return any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMI_SIZE"))


def run_bench(args):
    from .relaunch import bench_flags, mpiexec

    if args.steps < 1 or args.warmup < 0:
        return _error(f"--steps {args.steps} --warmup {args.warmup}: expected at least 1 timed "
                      "step and no negative warm-up")
    for flag, name, low in (("--batch-size", "batch_size", 1), ("--seq-len", "seq_len", 2),
                            ("--input-dim", "input_dim", 1), ("--wordvec-dim", "wordvec_dim", 1),
                            ("--hidden-dim", "hidden_dim", 1), ("--vocab-size", "vocab_size", 5),
                            ("--threads", "threads", 1), ("--micro-batch", "micro_batch", 1),
                            ("--ranks", "ranks", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            return _error(f"{flag}: expected an integer >= {low}, got {value}")
    try:  # on every rank, before any work: bf16 without MKL or AMX is refused here
        from ..config import check_precision

        check_precision(getattr(args, "precision", "fp32"), args.dtype, args.device,
                        bool(args.deterministic))
    except ValueError as exc:
        return _error(str(exc))
    if getattr(args, "precision", "fp32") != "fp32" and args.no_kernels:
        return _error("--precision bf16: runs on the fused CPU kernels, not with --no-kernels")
    if args.ranks and not _under_mpi():
        argv = bench_flags(args, drop={"ranks"})
        return subprocess.call([mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "dtrain",
                                "bench", *argv])
    from ..parallel.comm import Communicator, run_guarded

    comm = Communicator()
    return run_guarded(comm, run_step_bench, args, comm)


def _error(msg):
    print(f"dtrain: error: {msg}", file=sys.stderr)
    return 2


def step_settings(args):
    """The bench's step flags as the trainer's settings: one policy (dtrain.step.build_step)."""
    from ..config import TrainConfig

    return TrainConfig(batch_size=args.batch_size, micro_batch=args.micro_batch,
                       deterministic=bool(args.deterministic), embed_reduce=args.embed_reduce,
                       threads_per_rank=args.threads)


def run_step_bench(args, comm, drive=None):
    """Time the trainer's step on this rank and report it; exit code.

    ``drive(timer, result)`` (on a CPU; for the tooling in benchmarks/, which alternates
    processes): instead of timing here, hand over the ``CpuTimer``, not yet warmed up
    (``warmup(k)``, ``block(k)``), and ``result()``, the run's result dict; return what
    ``drive`` returns.
    """
    from .. import backend
    from ..nn.cells import get_cell
    from ..nn.model import CaptioningModel
    from ..step import build_step, micro_shards, rank_threads
    from .batches import open_batches
    from .workload import vocab

    try:
        device = backend.resolve_device(args.device)
    except backend.DeviceError as exc:
        return _error(str(exc))
    if args.batch_size % comm.size:
        return _error(f"--batch-size {args.batch_size} is not divisible by {comm.size} ranks")
    xp = backend.select(device, comm.local_rank)
    settings = step_settings(args)  # the trainer's policy: threads, micro-shards, accumulator
    threads = rank_threads(settings, comm)
    micro, _ = micro_shards(settings, comm)
    dtype = np.dtype(args.dtype)
    batches, work = open_batches(args, comm)

    def build(vocab_size=None, input_dim=None, width=None):
        """(model, adam, accumulator, step) of the run's sizes, or of another vocabulary/width:
        the trainer's step (build_step)."""
        model = CaptioningModel(work.word_to_idx if vocab_size is None else vocab(vocab_size),
                                work.input_dim if input_dim is None else input_dim,
                                args.wordvec_dim if width is None else width,
                                args.hidden_dim if width is None else width, args.cell, dtype=dtype,
                                seed=args.seed, xp=xp, use_kernels=not args.no_kernels,
                                precision=getattr(args, "precision", "fp32"))
        step = build_step(settings, comm, model)
        return model, step.optimizer, step.accumulator, step

    def complete(result):
        """The run's description beside its timings."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_mean = float(comm.allreduce_scalars(np.array([peak]))[0]) / comm.size  # a collective
        result.update({"framework": "dtrain", "pid": os.getpid(),
                       "torch_loaded": "torch" in sys.modules, "peak_rss_mb": peak_mean,
                       "deterministic": bool(args.deterministic), "micro_batch": micro,
                       "batches": work.source, "cell": args.cell, "dtype": args.dtype,
                       "precision": getattr(args, "precision", "fp32"), "N": args.batch_size,
                       "D": work.input_dim,
                       "W": args.wordvec_dim, "H": args.hidden_dim, "V": len(work.word_to_idx),
                       "ranks": comm.size})
        return result

    gates = get_cell(args.cell).gates
    if device == "gpu":
        from .gpu import run_gpu

        result = complete(run_gpu(args, comm, build, batches, gates, settings))
    else:
        from .cpu import CpuTimer

        timer = CpuTimer(args, comm, build, batches, gates)

        def cpu_result():
            return complete(timer.result(floor=not args.no_floor)
                            | {"threads_per_rank": threads, "blas": backend.blas_info()})

        if drive is not None:
            return drive(timer, cpu_result)
        timer.warmup(args.warmup)
        timer.block(args.steps)
        result = cpu_result()
    if comm.is_root:
        from .report import print_result

        print_result(result)
        if device == "gpu":
            from .gpu import print_gpu_lines

            print_gpu_lines(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0

