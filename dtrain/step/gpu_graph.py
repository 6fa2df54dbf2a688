"""The GPU training step: fixed-shape batches, one CUDA graph per batch shape.

On a GPU the recurrence is launch-bound: each time step is a GEMM and a
fused gate kernel forward and again backward, so an eager step is a few
hundred small launches from Python. ``GpuTrainStep`` runs the model's
fixed-shape mode (``CaptioningModel.forward_backward_fixed``: all N rows for T steps,
the loss masked inside the softmax kernel), so every batch of the same
(N, T) has the same kernels with the same arguments, and captures the step
(forward, backward and, on one rank, Adam) once per shape with CuPy stream
capture; later steps of that shape replay the graph: one launch.

Per step the host builds the batch's index arrays (``fixed_batch``) into one
pinned buffer and copies it to the device asynchronously (one copy); nothing
else crosses between host and device: the loss stays on the device until
the trainer logs it. Each shape has its own memory pool, workspace and
input buffer, so the addresses a graph was captured with stay its own.
Where capture is not supported the same code runs eagerly.
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from ..nn.model import FixedBatch, fixed_batch
from . import gpu_plan


def reduce_path(comm) -> str:
    """How GPU gradients cross ranks (reported at start; decided by gpu_plan.reduce_path)."""
    return gpu_plan.reduce_path(comm.size, comm.cuda_aware).description


class _Shape:
    """Everything one batch shape owns: pool, workspace, pinned and device
    input buffer, loss scalar, graph."""

    def __init__(self, cp, model, N, T, normalizer, fuse_adam):
        from ..nn.layers import Workspace

        self.N, self.T, self.normalizer, self.fuse_adam = N, T, normalizer, fuse_adam
        layout = gpu_plan.staging_layout(N, T, model.input_dim, model.dtype)
        self.nbytes = layout.nbytes  # one pinned buffer, one copy per step
        self.pinned = cp.cuda.alloc_pinned_memory(self.nbytes)
        host_bytes = np.frombuffer(self.pinned, dtype=np.uint8, count=self.nbytes)
        self.dev_bytes = cp.empty(self.nbytes, dtype=np.uint8)
        self.host = gpu_plan.staging_views(host_bytes, layout)
        self.dev = gpu_plan.staging_views(self.dev_bytes, layout)
        d = self.dev
        self.batch = FixedBatch(N=N, T=T, words=d["words"], targets=d["targets"],
                                weights=d["weights"], order=d["order"], seg_start=d["seg_start"],
                                ids=d["ids"], num_ids=0, num_tokens=0)
        self.loss = cp.zeros((), dtype=np.float64)
        self.pool = cp.cuda.MemoryPool()
        self.ws = Workspace()
        self.rows = None  # the embedding-gradient rows buffer (known after the first run)
        self.graph = None
        self.capture_error = None
        self.copy_done = cp.cuda.Event(disable_timing=True)
        self.uses = 0


class GpuTrainStep:
    """Forward, backward (and Adam, on one rank) of the fixed-shape model on a GPU.

    ``forward_backward(features, captions, normalizer, lr)`` takes
    the host batch, leaves the gradients in ``model.grad_buffer`` (the
    embedding's both dense and row-sparse) and returns a ``StepGrads`` whose
    loss is a 0-d device array. With ``adam_in_graph`` (one rank, one pass:
    nothing to reduce or accumulate) the Adam update is part of the same graph,
    with the step's hyperparameters from ``adam.advance``, and ``adam_in_pass``
    tells the caller so; otherwise the caller reduces the gradients and calls
    ``adam.step`` as on the CPU.
    ``graphs=False`` runs every step eagerly (the reference for the tests).
    """

    def __init__(self, model, adam, graphs=True, max_shapes=32, adam_in_graph=False):
        import cupy

        from ..kernels.cuda import GpuKernels

        if model.xp is not cupy:
            raise ValueError("GpuTrainStep needs a model built on CuPy arrays")
        self.cp = cupy
        self.model, self.adam = model, adam
        self.kernels = GpuKernels(model.dtype)
        self.use_graphs = bool(graphs)
        self.adam_in_pass = bool(adam_in_graph)
        self.fallback_reason = None
        self.max_shapes = max_shapes
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.shapes = {}
        self.replays = self.eager_runs = self.captures = 0
        self.timing = False  # record timed events around the device work (bench)
        self._null_ready = cupy.cuda.Event(disable_timing=True)
        self._done = cupy.cuda.Event(disable_timing=True)
        self.ev_start = cupy.cuda.Event()
        self.ev_end = cupy.cuda.Event()
        self.matmul = None
        try:
            from ..kernels.cuda import CublasMatmul

            self.matmul = CublasMatmul(self.stream)
        except Exception as exc:  # no direct cuBLAS: CuPy's matmul cannot be captured
            self.fallback_reason = f"direct cuBLAS unavailable: {type(exc).__name__}: {exc}"
            self.use_graphs = False

    def describe(self) -> str:
        adam = "; Adam in the graph" if self.adam_in_pass else "; Adam after the reduce"
        if self.use_graphs:
            return "CUDA graphs, one per batch shape (N, T)" + adam
        if self.fallback_reason:
            return f"eager launches (graph capture failed: {self.fallback_reason})" + adam
        return "eager launches" + adam

    # ------------------------------------------------------------------ the step
    @contextlib.contextmanager
    def _capturable_matmul(self):
        """``cupy.matmul`` is our direct cuBLAS gemm while the step runs (see
        gpu_kernels.CublasMatmul: CuPy's own refuses to be captured)."""
        cp, saved = self.cp, self.cp.matmul
        if self.matmul is not None:
            cp.matmul = self.matmul
        try:
            yield
        finally:
            cp.matmul = saved

    def _body(self, st):
        model, adam = self.model, self.adam
        model.forward_backward_fixed(st.dev["features"], st.batch, st.normalizer, ws=st.ws,
                                     loss_out=st.loss)
        if st.fuse_adam:
            self.kernels.adam_update_device(model.param_buffer, model.grad_buffer, adam.m, adam.v,
                                            st.dev["hyper"], adam.beta1, adam.beta2, adam.eps)

    def _capture(self, st):
        cp, s = self.cp, self.stream
        try:
            with cp.cuda.using_allocator(st.pool.malloc), self._capturable_matmul():
                s.begin_capture()
                try:
                    self._body(st)
                finally:
                    graph = s.end_capture()
            st.graph = graph
            self.captures += 1
        except Exception as exc:  # capture unsupported here: stay eager, say why
            st.capture_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            self.use_graphs = False
            self.fallback_reason = st.capture_error

    def _shape(self, N, T, normalizer, fuse_adam):
        key = gpu_plan.graph_key(N, T, normalizer, fuse_adam)
        st = self.shapes.get(key)
        if st is None:
            old = gpu_plan.shape_to_evict({k: v.uses for k, v in self.shapes.items()},
                                          self.max_shapes)
            if old is not None:  # the cache is full: drop the least used shape
                self.cp.cuda.Stream.null.synchronize()
                self.stream.synchronize()
                gone = self.shapes.pop(old)
                gone.graph = None
                gone.ws = None
                gone.pool.free_all_blocks()
            st = self.shapes[key] = _Shape(self.cp, self.model, N, T, normalizer, fuse_adam)
        st.uses += 1
        return st

    def forward_backward(self, features, captions, normalizer, lr=None, fuse_adam=None):
        """One step on the host batch (``features`` (N, D), ``captions`` (N, T+1)); Adam too
        where ``fuse_adam`` (default: ``adam_in_pass``)."""
        cp, model, s = self.cp, self.model, self.stream
        fuse_adam = self.adam_in_pass if fuse_adam is None else fuse_adam
        fb = fixed_batch(captions, model._null, model.dtype)
        st = self._shape(fb.N, fb.T, float(normalizer), bool(fuse_adam))
        st.copy_done.synchronize()  # the pinned buffer is ours again
        # with Adam in the graph the optimizer counts the step and gives its hyperparameters
        hyper = self.adam.advance(lr) if fuse_adam else None
        gpu_plan.fill_staging(st.host, features, fb, hyper)
        # our stream starts after everything queued so far on the default stream
        # (gradient unstaging, Adam, checkpoint loads) ...
        self._null_ready.record(cp.cuda.Stream.null)
        s.wait_event(self._null_ready)
        st.dev_bytes.data.copy_from_host_async(ctypes.c_void_p(st.pinned.ptr), st.nbytes, s)
        st.copy_done.record(s)
        if self.timing:
            self.ev_start.record(s)
        with s:
            if st.graph is not None:
                st.graph.launch(s)
                self.replays += 1
            else:
                with cp.cuda.using_allocator(st.pool.malloc), self._capturable_matmul():
                    self._body(st)
                self.eager_runs += 1
                if st.rows is None:  # the (M, W) buffer the embedding rows are summed into
                    st.rows = st.ws.get("fx_embed_rows", (st.N * st.T, model.wordvec_dim),
                                        model.dtype, cp)
                if self.use_graphs:
                    self._capture(st)  # recorded, not run: the next step of this shape replays it
        if self.timing:
            self.ev_end.record(s)
        # ... and the default stream (MPI staging, logging) waits for this step
        self._done.record(s)
        cp.cuda.Stream.null.wait_event(self._done)
        return model.step_grads(st.loss, fb.num_tokens, st.batch.ids[: fb.num_ids],
                                st.rows[: fb.num_ids], dense=True)
