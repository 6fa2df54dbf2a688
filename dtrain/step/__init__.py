"""The one training step: batch -> forward/backward -> reduce -> Adam.

The trainer, the CPU bench and the GPU bench all run :class:`TrainStep`, so
what the bench times is what training does:

    packed = pack_captions(captions)                      # host: sort by length, pack
    grads  = model.forward_backward(features, packed, B)  # into the model's grad_buffer
    reduced = reducer.reduce(grads, loss, tokens, stop)   # the global gradient (parallel/reducer.py)
    adam.step(param_buffer, grad_buffer, lr)              # the same arithmetic on every rank

On a GPU the forward/backward is :class:`~dtrain.step.gpu_graph.GpuTrainStep`
(fixed shapes, one CUDA graph per shape); on one GPU rank Adam runs inside
that graph, with its hyperparameters from ``adam.advance``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..backend import to_device
from ..nn.model import pack_captions
from ..parallel.reducer import DeterministicReducer, LocalReducer


@dataclass
class StepResult:
    """What one step did, globally: loss and tokens summed over ranks."""

    loss: object  # float, or a 0-d device array on one GPU rank (read it when logging)
    tokens: float
    stop: bool  # some rank asked to stop (a signal)
    mode: str  # how the gradients were reduced: local, dense or sparse
    bytes: int  # estimated bytes this rank sent plus received
    compute_s: float
    comm_s: float
    seconds: float
    # time.perf_counter() at the phase boundaries, for traces: start, forward_end
    # (0 where not measured: the GPU graph), backward_end, reduce_end, end
    marks: dict


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient is not finite on some rank; the step was not applied."""

    def __init__(self, ranks, loss):
        self.ranks, self.loss = list(ranks), loss
        super().__init__(f"non-finite loss or gradient on rank(s) {self.ranks} (global loss {loss})")


def _all_finite(xp, *arrays, kernels=None) -> bool:
    """True when every entry is finite: one reading pass each (the CPU kernels' check
    of the exponent bits where they offer one, else a sum, for which a sum of finite
    values that overflows counts as non-finite too)."""
    check = getattr(kernels, "all_finite", None)
    if check is not None:
        return all(check(a) for a in arrays if a.size)
    return all(bool(xp.isfinite(a.sum())) for a in arrays if a.size)


class FloatAccumulator:
    """Gradient accumulation over micro-shards in floating point (``--micro-batch`` alone).

    The dense gradients are summed in micro-shard order into a buffer of their
    own, the embedding rows into a dense (V, W) buffer (rows of words seen), so
    the result is one ``StepGrads`` for the reducer, as if one pass had run.
    """

    def __init__(self, model):
        xp, self.model = model.xp, model
        self.dense = xp.zeros(model.embed_offset, dtype=model.dtype)
        self.embed = xp.zeros(model.shapes["W_embed"], dtype=model.dtype)
        self.touched = xp.zeros(model.shapes["W_embed"][0], dtype=bool)

    def start(self):
        self.dense.fill(0)
        self.embed.fill(0)
        self.touched.fill(False)
        self.loss, self.tokens = 0.0, 0

    def add(self, grads):
        self.loss += float(grads.loss)
        self.tokens += grads.tokens
        self.dense += grads.grad_buffer[: grads.embed_offset]
        if grads.embed_ids.shape[0]:
            ids = grads.embed_ids
            self.embed[ids] += grads.embed_rows  # ids are unique within a micro-shard
            self.touched[ids] = True

    def result(self):
        model, xp = self.model, self.model.xp
        model.grad_buffer[: model.embed_offset] = self.dense
        ids = xp.flatnonzero(self.touched)
        return model.step_grads(self.loss, self.tokens, ids, self.embed[ids], dense=False)


class TrainStep:
    """Runs one data-parallel step of ``model`` with ``optimizer`` and ``reducer``.

    ``micro_batch`` m cuts this rank's rows into micro-shards of m rows (by
    position), run one after the other: activation memory is bounded by m, and
    with a :class:`~dtrain.parallel.reducer.DeterministicReducer` every micro-shard
    is computed with the same shapes whatever the number of ranks.
    ``check(grads)``, when given to a call, inspects the local gradients
    between the backward pass and the reduction (``--debug``).
    """

    def __init__(self, model, optimizer, reducer, graphs=True, micro_batch=None):
        self.model, self.optimizer, self.reducer = model, optimizer, reducer
        self.micro_batch = micro_batch
        self.deterministic = isinstance(reducer, DeterministicReducer)
        self.accumulator = None
        self.gpu = None
        if model.xp is not np:
            from .gpu_graph import GpuTrainStep

            self.gpu = GpuTrainStep(model, optimizer, graphs=graphs)
        # one GPU rank, one pass: nothing to reduce, so Adam runs inside the step's graph
        self.fused_adam = (self.gpu is not None and isinstance(reducer, LocalReducer)
                           and micro_batch is None)

    def describe(self) -> str:
        micro = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        if self.gpu is None:
            from ..kernels import pool

            kern = self.model.kernels.name if self.model.kernels is not None else "plain xp"
            return (f"packed CPU step ({kern} kernels; threads: {pool.status()}), {self.reducer.mode} "
                    f"gradient reduce{micro}")
        from .gpu_graph import reduce_path

        return (f"{self.gpu.describe()}; Adam {'in the graph' if self.fused_adam else 'after the reduce'}"
                f"{micro}; gradient reduce: {self.reducer.mode}, {reduce_path(self.reducer.comm)}")

    def _shards(self, n):
        m = self.micro_batch or n
        if m <= 0 or n % m:
            raise ValueError(f"--micro-batch {m} does not divide this rank's {n} rows")
        return [slice(i, i + m) for i in range(0, n, m)] if n else [slice(0, 0)]

    def _forward_backward(self, features, captions, normalizer, lr):
        model = self.model
        if self.gpu is not None:  # batch in through pinned memory, one graph replay
            return self.gpu.forward_backward(features, captions, normalizer, lr, fuse_adam=self.fused_adam)
        packed = pack_captions(captions, model.null_idx, model.kernels)
        return model.forward_backward(to_device(features, model.xp), packed, normalizer)

    def _check_finite(self, reduced, local_ok):
        """Raise NonFiniteError (on every rank alike) before a non-finite step reaches Adam.

        The reduced loss and gradient are identical on every rank, so every rank takes
        the same decision; only then do the ranks' own flags travel, to name the culprits.
        """
        loss = float(reduced.loss)
        if math.isfinite(loss) and _all_finite(self.model.xp, self.model.grad_buffer, kernels=self.model.kernels):
            return
        comm = self.reducer.comm
        size = comm.size if comm is not None else 1
        ok = 1.0 if local_ok is None else float(local_ok)
        flags = comm.allgather_scalars([ok])[:, 0] if size > 1 else [ok]
        bad = [r for r, f in enumerate(flags) if f == 0] or list(range(size))
        raise NonFiniteError(bad, loss)

    def __call__(self, features, captions, normalizer, lr, stop=False, check=None) -> StepResult:
        model = self.model
        t0 = time.perf_counter()
        shards = self._shards(captions.shape[0])
        forward_end = 0.0
        if self.deterministic:
            reduced = None
            while reduced is None:  # computed again only when the fixed-point scales change
                self.reducer.start(model.grad_buffer, model.shapes["W_embed"])
                for rows in shards:
                    grads = self._forward_backward(features[rows], captions[rows], normalizer, lr)
                    if check is not None:
                        check(grads)
                    self.reducer.add(grads)
                t1 = time.perf_counter()
                reduced = self.reducer.reduce(stop)
        else:
            if len(shards) == 1:
                grads = self._forward_backward(features, captions, normalizer, lr)
                forward_end = grads.forward_end
                if check is not None:
                    check(grads)
            else:
                if self.accumulator is None:
                    self.accumulator = FloatAccumulator(model)
                self.accumulator.start()
                for rows in shards:
                    part = self._forward_backward(features[rows], captions[rows], normalizer, lr)
                    if check is not None:
                        check(part)
                    self.accumulator.add(part)
                grads = self.accumulator.result()
            loss = grads.loss if self.fused_adam else float(grads.loss)
            t1 = time.perf_counter()
            # one rank: the global check below sees the same numbers, no need to look twice
            local_ok = self.fused_adam or isinstance(self.reducer, LocalReducer) or (math.isfinite(loss) and _all_finite(
                model.xp, grads.grad_buffer[: grads.embed_offset], grads.embed_rows, kernels=model.kernels))
            reduced = self.reducer.reduce(grads, loss, grads.tokens, stop)
        t2 = time.perf_counter()
        if not self.fused_adam:
            self._check_finite(reduced, local_ok if not self.deterministic else None)
            self.optimizer.step(model.param_buffer, model.grad_buffer, lr=lr)
        t3 = time.perf_counter()
        marks = {"start": t0, "forward_end": forward_end, "backward_end": t1, "reduce_end": t2, "end": t3}
        return StepResult(loss=reduced.loss, tokens=reduced.tokens, stop=reduced.stop, mode=reduced.mode,
                          bytes=reduced.bytes, compute_s=t1 - t0, comm_s=reduced.seconds, seconds=t3 - t0,
                          marks=marks)
