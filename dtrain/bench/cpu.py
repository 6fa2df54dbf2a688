"""The CPU half of ``dtrain bench``: the trainer's step, timed as the trainer runs it.

Each timed step is what one iteration of ``Trainer.train`` does: assemble the
batch (``split.batch(sampler.next_shard())``), then ``TrainStep`` (packing,
forward, backward, the gradient reducer, Adam). Its time runs from before the
batch assembly to the end of Adam; the trainer's logged ms/step is
``StepResult.seconds`` (the step without the batch assembly), reported beside
it as ``step_only_ms``. After the timed steps, on one rank, a few of the same
batches are run again profiled (``floor.py``): the GEMM floor and the
breakdown of what is not GEMM.

``CpuTimer`` times in blocks (``block(k)``), so that a comparison can
alternate blocks of two frameworks kept alive in two processes (benchmarks/).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .floor import profile_steps
from .workload import mean_step_flops

PROFILED_BATCHES = 5


class CpuTimer:
    """Warm-up, timed blocks of steps, and the result of all of them.

    ``build(vocab_size, input_dim, width)``: (model, adam, accumulator, step), None sizes
    meaning the run's own; ``batches.next()`` gives this rank's (captions, features).
    """

    def __init__(self, args, comm, build, batches, gates):
        self.args, self.comm, self.build = args, comm, build
        self.batches, self.gates = batches, gates
        self.model, self.adam, self.accumulator, self.step = build(None, None, None)
        self.times, self.step_only, self.batch_t, self.comm_t, self.waits = [], [], [], [], []
        self.modes, self.nbytes, self.tokens, self.kept, self.blocks = [], [], [], [], []

    def warmup(self, steps):
        for _ in range(steps):
            captions, features = self.batches.next()
            self.step(features, captions, self.args.batch_size, 1e-3)

    def block(self, steps):
        """Time ``steps`` steps; their times in seconds."""
        comm, B = self.comm, self.args.batch_size
        times = []
        for _ in range(steps):
            if comm.size > 1:
                comm.barrier()
            t0 = time.perf_counter()
            captions, features = self.batches.next()
            t1 = time.perf_counter()
            r = self.step(features, captions, B, 1e-3)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            self.batch_t.append(t1 - t0)
            self.step_only.append(r.seconds)
            self.comm_t.append(r.comm_s)
            self.modes.append(r.mode)
            self.nbytes.append(r.bytes)
            self.tokens.append(r.tokens)
            self.kept.append((captions, features))
            if comm.size > 1:  # outside the timed step: how long this rank waited for the slowest
                compute = comm.allgather_scalars([r.compute_s])[:, 0]
                self.waits.append(float(compute.max()) - r.compute_s)
        self.times += times
        self.blocks.append(statistics.median(times) * 1e3)
        return times

    def result(self, floor=True):
        """Medians over every timed step (milliseconds), and on one rank the GEMM floor."""
        comm, model, B = self.comm, self.model, self.args.batch_size
        med = statistics.median
        t = med(self.times)
        local_flops = mean_step_flops(model, [c for c, _ in self.kept], self.gates)
        flops = float(comm.allreduce_scalars(np.array([local_flops]))[0])
        tok = float(np.mean(self.tokens))
        seq_len = self.kept[0][0].shape[1] - 1
        modes = self.modes
        kernels = model.kernels.name if model.kernels is not None else "plain xp"
        result = {"device": "cpu", "kernels": kernels,
                  "step_mode": self.step.describe(), "median_ms": t * 1e3,
                  "step_only_ms": med(self.step_only) * 1e3, "batch_ms": med(self.batch_t) * 1e3,
                  "tokens_per_step": tok, "tokens_per_s": tok / t, "gflops": flops / t / 1e9,
                  "gflop_per_step": flops / 1e9, "real_token_fraction": tok / (B * seq_len),
                  "T": seq_len, "step_times_ms": [x * 1e3 for x in self.times],
                  "block_medians_ms": self.blocks, "bytes_per_step": int(med(self.nbytes)),
                  "reduce_mode": max(set(modes), key=modes.count)}
        if comm.size > 1:
            # the mean over ranks: every rank measured the same collective
            comm_med = float(comm.allreduce_scalars(np.array([med(self.comm_t)]))[0]) / comm.size
            wait_med = float(comm.allreduce_scalars(np.array([med(self.waits)]))[0]) / comm.size
            result.update({"comm_ms": comm_med * 1e3, "compute_ms": (t - comm_med) * 1e3,
                           "comm_share": comm_med / t, "comm_wait_ms": wait_med * 1e3,
                           "comm_transfer_ms": max(0.0, comm_med - wait_med) * 1e3,
                           "embed_reduce": result["reduce_mode"]})
        if floor and comm.size == 1:
            prof = profile_steps(self.build, model, self.adam, self.accumulator, self.step,
                                 self.kept[:PROFILED_BATCHES], B, result["batch_ms"])
            prof["timed_over_floor"] = (result["median_ms"] / prof["floor_ms"]
                                        if prof["floor_ms"] else None)
            result.update(prof)
        return result


def run_cpu(args, comm, build, batches, gates, floor=True):
    """Time ``args.steps`` steps after ``args.warmup``; a result dict (milliseconds)."""
    timer = CpuTimer(args, comm, build, batches, gates)
    timer.warmup(args.warmup)
    timer.block(args.steps)
    return timer.result(floor)
