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

import time
from dataclasses import dataclass

import numpy as np

from ..backend import to_device
from ..nn.model import pack_captions
from ..parallel.reducer import LocalReducer


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


class TrainStep:
    """Runs one data-parallel step of ``model`` with ``optimizer`` and ``reducer``.

    ``check(grads)``, when given to a call, inspects the local gradients
    between the backward pass and the reduction (``--debug``).
    """

    def __init__(self, model, optimizer, reducer, graphs=True):
        self.model, self.optimizer, self.reducer = model, optimizer, reducer
        self.gpu = None
        if model.xp is not np:
            from .gpu_graph import GpuTrainStep

            self.gpu = GpuTrainStep(model, optimizer, graphs=graphs)
        # one GPU rank: nothing to reduce, so Adam runs inside the step's graph
        self.fused_adam = self.gpu is not None and isinstance(reducer, LocalReducer)

    def describe(self) -> str:
        if self.gpu is None:
            kern = self.model.kernels.name if self.model.kernels is not None else "plain xp"
            return f"packed CPU step ({kern} kernels), {self.reducer.mode} gradient reduce"
        return f"{self.gpu.describe()}; Adam {'in the graph' if self.fused_adam else 'after the reduce'}"

    def __call__(self, features, captions, normalizer, lr, stop=False, check=None) -> StepResult:
        model = self.model
        t0 = time.perf_counter()
        if self.gpu is not None:  # batch in through pinned memory, one graph replay
            grads = self.gpu.forward_backward(features, captions, normalizer, lr, fuse_adam=self.fused_adam)
            loss = grads.loss if self.fused_adam else float(grads.loss)
        else:
            packed = pack_captions(captions, model.null_idx)
            grads = model.forward_backward(to_device(features, model.xp), packed, normalizer)
            loss = grads.loss
        if check is not None:
            check(grads)
        t1 = time.perf_counter()
        reduced = self.reducer.reduce(grads, loss, grads.tokens, stop)
        t2 = time.perf_counter()
        if not self.fused_adam:
            self.optimizer.step(model.param_buffer, model.grad_buffer, lr=lr)
        t3 = time.perf_counter()
        marks = {"start": t0, "forward_end": grads.forward_end, "backward_end": t1, "reduce_end": t2,
                 "end": t3}
        return StepResult(loss=reduced.loss, tokens=reduced.tokens, stop=reduced.stop, mode=reduced.mode,
                          bytes=reduced.bytes, compute_s=t1 - t0, comm_s=reduced.seconds, seconds=t3 - t0,
                          marks=marks)
