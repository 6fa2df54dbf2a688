"""The one training step: micro-shards -> forward/backward -> accumulate and reduce -> Adam.

The trainer, the CPU bench and the GPU bench all build their step with
:func:`build_step`, so what the bench times is what training does, and the
thread, micro-batch and reduction policy exists once. One step:

    acc.start()
    for rows in micro_shards:                          # one, unless --micro-batch/--deterministic
        grads = pass(features[rows], captions[rows])   # pack, forward, backward (StepGrads)
        acc.add(grads)
    reduced = acc.finish(stop)                         # global gradient (parallel/accumulate.py)
    adam.step(param_buffer, grad_buffer, lr)           # the same arithmetic on every rank

The accumulator (pass-through, float or fixed point) is chosen once, here. On a
GPU the pass is :class:`~dtrain.step.gpu_graph.GpuTrainStep` (fixed shapes, one
CUDA graph per shape); on one GPU rank with one pass it runs Adam inside that
graph itself, and says so.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from .. import backend
from ..backend import to_device
from ..errors import UserError
from ..kernels import for_arrays
from ..nn.model import pack_captions
from ..nn.optim import Adam
from ..parallel.accumulate import FixedPointAccumulator, FloatAccumulator, PassThrough
from ..parallel.reducer import make_reducer


@dataclass
class StepResult:
    """What one step did, globally: loss and tokens summed over ranks."""

    loss: object  # float, or a 0-d device array on one GPU rank (read it when logging)
    tokens: float
    stop: bool  # some rank asked to stop (a signal)
    mode: str  # how the gradients were reduced: local, dense, sparse or deterministic-*
    bytes: int  # estimated bytes this rank sent plus received
    compute_s: float
    comm_s: float
    seconds: float
    # time.perf_counter() at the phase boundaries, for traces: start, forward_end
    # (0 where not measured: several micro-shards, the GPU graph), backward_end,
    # reduce_end, end
    marks: dict


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient is not finite on some rank; the step was not applied."""

    def __init__(self, ranks, loss):
        self.ranks, self.loss = list(ranks), loss
        super().__init__(f"non-finite loss or gradient on rank(s) {self.ranks} "
                         f"(global loss {loss})")


def _all_finite(xp, *arrays, kernels=None) -> bool:
    """True when every entry is finite: one reading pass each (the CPU kernels' check
    of the exponent bits where they offer one, else a sum, for which a sum of finite
    values that overflows counts as non-finite too)."""
    check = getattr(kernels, "all_finite", None)
    if check is not None:
        return all(check(a) for a in arrays if a.size)
    return all(bool(xp.isfinite(a.sum())) for a in arrays if a.size)


class CpuPass:
    """One forward/backward pass on the host: pack the captions, then the model's hot path.

    ``vocab_ready()``, when given, is called by the model once W_vocab's and b_vocab's
    gradients are final, before backpropagation through time (``--overlap-reduce``)."""

    adam_in_pass = False

    def __init__(self, model, vocab_ready=None):
        self.model = model
        self.vocab_ready = vocab_ready

    def forward_backward(self, features, captions, normalizer, lr):
        model = self.model
        packed = pack_captions(captions, model.null_idx, model.kernels)
        features = to_device(features, model.xp)
        if self.vocab_ready is None:
            return model.forward_backward(features, packed, normalizer)
        return model.forward_backward(features, packed, normalizer, vocab_ready=self.vocab_ready)

    def describe(self) -> str:
        from ..kernels import pool

        kern = self.model.kernels.name if self.model.kernels is not None else "plain xp"
        return f"packed CPU step ({kern} kernels; threads: {pool.status()})"


class TrainStep:
    """Runs one data-parallel step of ``model`` with ``optimizer`` and ``accumulator``.

    ``micro_batch`` m cuts this rank's rows into micro-shards of m rows (by
    position), run one after the other: activation memory is bounded by m, and
    with a fixed-point accumulator every micro-shard is computed with the same
    shapes whatever the number of ranks. ``check(grads)``, when given to a call,
    inspects each pass's local gradients before they are accumulated (``--debug``).
    A step whose global loss or gradient is not finite is not applied: NonFiniteError,
    on every rank alike, naming the ranks whose own numbers were not finite.
    """

    def __init__(self, model, optimizer, accumulator, comm=None, micro_batch=None, gpu=None,
                 vocab_ready=None):
        self.model, self.optimizer = model, optimizer
        self.accumulator, self.comm = accumulator, comm
        self.micro_batch = micro_batch
        self.gpu = gpu  # the GPU pass (GpuTrainStep), or None: the packed host pass
        self.step_pass = gpu if gpu is not None else CpuPass(model, vocab_ready)
        # one GPU rank, one pass: the pass ran Adam inside its graph (GpuTrainStep decides)
        self.adam_in_pass = bool(self.step_pass.adam_in_pass)
        # A Gemm that converts its operands (bf16) gets the weights converted by Adam's pass
        # over them (param_twin) and reads them from there in the next step: current only
        # after this object's own update, and nothing else writes the parameters between
        # two steps (a guard in operands_fixed spot-checks it).
        self._weight_bits = None if gpu is not None else model.gemm.param_twin(model.param_buffer)
        self._weight_bits_current = False

    def describe(self) -> str:
        micro = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        text = f"{self.step_pass.describe()}{micro}; gradient reduce: {self.accumulator.mode}"
        reducer = getattr(self.accumulator, "reducer", None)
        if getattr(reducer, "reduce_dtype", "fp32") != "fp32":
            text += f", dense part sent as {reducer.reduce_dtype}"
        if getattr(reducer, "early", None) is not None:
            text += ", W_vocab/b_vocab reduced during BPTT"
        if self.gpu is not None:
            from .gpu_graph import reduce_path

            text += f", {reduce_path(self.comm)}"
        return text

    def _shards(self, n):
        m = self.micro_batch or n
        if m <= 0 or n % m:
            raise ValueError(f"--micro-batch {m} does not divide this rank's {n} rows")
        return [slice(i, i + m) for i in range(0, n, m)] if n else [slice(0, 0)]

    def _check_finite(self, reduced):
        """Raise NonFiniteError (on every rank alike) before a non-finite step reaches Adam.

        The reduced loss and gradient are identical on every rank, so every rank takes
        the same decision; only then do the ranks' own flags travel, to name the culprits.
        """
        model = self.model
        loss = float(reduced.loss)
        if math.isfinite(loss) and _all_finite(model.xp, model.grad_buffer, kernels=model.kernels):
            return
        comm = self.comm
        size = comm.size if comm is not None else 1
        ok = float(self.accumulator.local_finite)
        flags = comm.allgather_scalars([ok])[:, 0] if size > 1 else [ok]
        bad = [r for r, f in enumerate(flags) if f == 0] or list(range(size))
        raise NonFiniteError(bad, loss)

    def __call__(self, features, captions, normalizer, lr, stop=False, check=None) -> StepResult:
        acc, step_pass = self.accumulator, self.step_pass
        t0 = time.perf_counter()
        shards = self._shards(captions.shape[0])
        reduced = None
        bits, model = self._weight_bits, self.model
        converted = (model.param_buffer, bits) if self._weight_bits_current else None
        with model.weights_fixed(converted) if self.gpu is None else contextlib.nullcontext():
            while reduced is None:  # None: the fixed-point sums asked again, with new scales
                acc.start()
                for rows in shards:
                    grads = step_pass.forward_backward(features[rows], captions[rows],
                                                       normalizer, lr)
                    if check is not None:
                        check(grads)
                    acc.add(grads)
                t1 = time.perf_counter()
                reduced = acc.finish(stop)
        t2 = time.perf_counter()
        if not self.adam_in_pass:
            self._check_finite(reduced)
            extra = {} if bits is None else {"bits": bits}
            self.optimizer.step(model.param_buffer, model.grad_buffer, lr=lr, **extra)
            self._weight_bits_current = bits is not None
        t3 = time.perf_counter()
        forward_end = grads.forward_end if len(shards) == 1 else 0.0
        marks = {"start": t0, "forward_end": forward_end, "backward_end": t1, "reduce_end": t2,
                 "end": t3}
        return StepResult(loss=reduced.loss, tokens=reduced.tokens, stop=reduced.stop,
                          mode=reduced.mode, bytes=reduced.bytes, compute_s=t1 - t0,
                          comm_s=reduced.seconds, seconds=t3 - t0, marks=marks)


# ---------------------------------------------------------------------------
# the policy, once: threads, micro-shards, the accumulator, the pass


def requested_threads(cfg) -> int | None:
    """``threads_per_rank``; with ``deterministic`` one unless given, since BLAS results depend
    on the thread count, which must then not follow the number of ranks; else None (the
    node's cores over its ranks)."""
    return cfg.threads_per_rank or (1 if cfg.deterministic else None)


def micro_batch_rows(cfg) -> int | None:
    """Rows per micro-shard, or None for one pass: ``micro_batch``; ``deterministic`` needs
    micro-shards (their shapes must not depend on the number of ranks): 8 rows unless given."""
    return cfg.micro_batch or (math.gcd(cfg.batch_size, 8) if cfg.deterministic else None)


def rank_threads(cfg, comm) -> int:
    """Set and return this rank's threads (``requested_threads``, else the node's cores over
    its ranks). Call before building the model: its kernels use the pool."""
    threads = backend.node_threads(comm.local_size, requested_threads(cfg))
    backend.set_threads(threads, comm.local_size)
    return threads


def micro_shards(cfg, comm) -> tuple[int | None, int]:
    """(rows per micro-shard or None, micro-shards in the global batch).

    Micro-shards are rows of the global batch by position (``micro_batch_rows``).
    UserError, one line naming --micro-batch, when the ranks cannot share them.
    """
    B, size = cfg.batch_size, comm.size
    micro = micro_batch_rows(cfg)
    if micro and B % micro:
        raise UserError(f"--micro-batch {micro}: expected a divisor of --batch-size {B}")
    total = B // micro if micro else size
    if total % size:
        raise UserError(f"--micro-batch {micro}: the {total} micro-shards of --batch-size {B} "
                        f"cannot be shared by {size} ranks; use a number of ranks that divides "
                        f"{total}")
    return micro, total


def build_step(cfg, comm, model, optimizer=None, graphs=True) -> TrainStep:
    """The training step for settings ``cfg`` (a TrainConfig: batch_size, micro_batch,
    deterministic, embed_reduce, buckets, reduce_dtype, overlap_reduce, lr) on ``comm``, for
    ``model``.

    Adam over the model's flat buffer unless ``optimizer`` is given (two steps
    sharing one, as the GPU bench's graphed and eager runs do). The accumulator:
    fixed point with ``deterministic``, float with micro-shards, else pass-through.
    """
    micro, total_micro = micro_shards(cfg, comm)
    rows = cfg.batch_size // comm.size
    step_micro = micro if micro and micro < rows else None  # None: one pass over the rows
    xp, kernels = model.xp, model.kernels
    vocab_ready = None
    if optimizer is None:
        optimizer = Adam(model.num_params, lr=cfg.lr, xp=xp, dtype=model.dtype,
                         kernels=for_arrays(xp, model.dtype) if kernels is not None else None)

    def all_finite(*arrays):
        return _all_finite(xp, *arrays, kernels=kernels)

    if cfg.deterministic:
        accumulator = FixedPointAccumulator(comm, model.segments, total_micro, cfg.embed_reduce,
                                            all_finite, kernels)
    else:
        # --overlap-reduce: only where the pass can start it (one host pass per step)
        early = (vocab_bounds(model.segments)
                 if getattr(cfg, "overlap_reduce", False) and xp is np and step_micro is None
                 else None)
        reducer = make_reducer(comm, cfg.embed_reduce, getattr(cfg, "buckets", 1),
                               getattr(cfg, "reduce_dtype", "fp32"), early)
        sums = FloatAccumulator if step_micro else PassThrough
        accumulator = sums(reducer, all_finite)
        if reducer.early is not None:
            vocab_ready = partial(reducer.start_early, model.grad_buffer)
    gpu = None
    if xp is not np:
        from .gpu_graph import GpuTrainStep

        # nothing to reduce or accumulate: Adam can run inside the pass's graph
        alone = comm.size == 1 and step_micro is None and not cfg.deterministic
        gpu = GpuTrainStep(model, optimizer, graphs=graphs, adam_in_graph=alone)
    return TrainStep(model, optimizer, accumulator, comm, micro_batch=step_micro, gpu=gpu,
                     vocab_ready=vocab_ready)


def vocab_bounds(segments) -> tuple[int, int]:
    """[lo, hi) of W_vocab's and b_vocab's gradients in the flat buffer: one contiguous
    range (the model lays them out one after the other)."""
    where = {name: (lo, hi) for name, lo, hi in segments}
    (lo, mid), (mid2, hi) = where["W_vocab"], where["b_vocab"]
    if mid != mid2:
        raise ValueError("W_vocab and b_vocab are not adjacent in the flat buffer")
    return lo, hi
