"""Host-side decisions of the GPU step, as plain functions (no CuPy, no device).

``step/gpu_graph.py`` does the CUDA work (pinned memory, streams, graphs); what it
decides on the host lives here so that CI, which has no GPU, tests it:

* the staging layout: every array one step sends to the device (features, loss
  weights, Adam scalars, the fixed-shape index arrays) at its own 256-byte aligned
  offset in one buffer, so one host-to-device copy of ``nbytes`` carries the batch;
* the graph cache: which batches share a captured CUDA graph (``graph_key``) and
  which shape gives way when the cache is full (``shape_to_evict``);
* the gradient reduce path for a world size and a CUDA-aware or plain MPI library.

The device of a rank (local rank modulo the node's devices) is
``backend.device_for_rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

STAGING_ALIGN = 256  # bytes: every field starts on a boundary any kernel load accepts
# the fixed-shape batch arrays, as ``nn.model.FixedBatch`` names them
BATCH_FIELDS = ("weights", "words", "targets", "order", "seg_start", "ids")


class StagingField(NamedTuple):
    name: str
    shape: tuple
    dtype: np.dtype
    offset: int  # bytes from the start of the buffer
    nbytes: int  # bytes of data (the field's slot is rounded up to STAGING_ALIGN)


class StagingLayout(NamedTuple):
    fields: tuple  # StagingField, in buffer order
    nbytes: int  # the whole buffer: what one copy moves


def staging_layout(N: int, T: int, input_dim: int, dtype) -> StagingLayout:
    """Where each input of an (N, T) step sits in the one pinned buffer.

    Invariants: fields do not overlap, each starts at a multiple of STAGING_ALIGN,
    ``nbytes`` is the sum of the fields' rounded-up slots. M = N * T positions.
    """
    M, dtype = N * T, np.dtype(dtype)
    spec = [("features", (N, input_dim), dtype), ("weights", (M,), dtype),
            ("hyper", (2,), np.dtype(np.float64)),  # (lr / bias1, 1 / bias2) for Adam in the graph
            ("words", (M,), np.dtype(np.int32)), ("targets", (M,), np.dtype(np.int32)),
            ("order", (M,), np.dtype(np.int32)), ("seg_start", (M + 1,), np.dtype(np.int32)),
            ("ids", (M,), np.dtype(np.int32))]
    fields, offset = [], 0
    for name, shape, dt in spec:
        nbytes = int(np.prod(shape)) * dt.itemsize
        fields.append(StagingField(name, shape, dt, offset, nbytes))
        offset += -(-nbytes // STAGING_ALIGN) * STAGING_ALIGN
    return StagingLayout(tuple(fields), offset)


def staging_views(buffer, layout: StagingLayout) -> dict:
    """Typed views of a 1-D uint8 ``buffer`` (NumPy or CuPy) of ``layout.nbytes``, by name."""
    if buffer.shape != (layout.nbytes,) or buffer.dtype != np.uint8:
        raise ValueError(f"staging buffer: expected uint8 ({layout.nbytes},), got "
                         f"{buffer.dtype} {buffer.shape}")
    return {f.name: buffer[f.offset : f.offset + f.nbytes].view(f.dtype).reshape(f.shape)
            for f in layout.fields}


def fill_staging(host: dict, features, batch, hyper=None) -> None:
    """Write one step's inputs into the host views: the features, the fixed-shape
    ``batch`` arrays and, when Adam runs inside the graph, its two scalars."""
    host["features"][...] = features
    for name in BATCH_FIELDS:
        host[name][...] = getattr(batch, name)
    if hyper is not None:
        host["hyper"][...] = hyper


class GraphKey(NamedTuple):
    """What a captured step depends on: its shapes (N, T), the loss normaliser
    (a kernel argument baked into the graph) and whether Adam is inside it."""

    N: int
    T: int
    normalizer: float
    fuse_adam: bool


def graph_key(N, T, normalizer, fuse_adam) -> GraphKey:
    """The cache key of a step; equal keys replay the same graph."""
    return GraphKey(int(N), int(T), float(normalizer), bool(fuse_adam))


def shape_to_evict(uses: Mapping, max_shapes: int):
    """The shape to drop before a new one is added (the least used; the oldest of a
    tie, ``uses`` being in insertion order), or None while fewer than ``max_shapes``."""
    if max_shapes < 1:
        raise ValueError(f"max_shapes: expected at least 1, got {max_shapes}")
    if len(uses) < max_shapes:
        return None
    return min(uses, key=uses.__getitem__)


class ReducePath(NamedTuple):
    kind: str  # "none" | "device" | "host-staged"
    description: str


def reduce_path(world_size: int, cuda_aware: bool) -> ReducePath:
    """How GPU gradients cross ranks: not at all on one rank; device buffers handed
    to a CUDA-aware MPI; otherwise one pinned host buffer, one copy each way."""
    if world_size < 1:
        raise ValueError(f"world size: expected at least 1, got {world_size}")
    if world_size == 1:
        return ReducePath("none", "none (1 rank)")
    if cuda_aware:
        return ReducePath("device", "CUDA-aware MPI: device buffers passed to mpi4py directly")
    return ReducePath("host-staged", "host-staged: one pinned host buffer, one copy each way")
