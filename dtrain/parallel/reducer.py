"""Summing one step's gradients over the ranks: one class per strategy.

Every rank computed the gradient of (its summed token loss / global batch), so
the SUM over ranks is the global batch's gradient. The dense gradient of every
parameter lives in one flat buffer; the word embedding's is row-sparse (only
the words of the batch), given as (ids, rows) beside it. A reducer takes a
:class:`~dtrain.nn.model.StepGrads` and this rank's loss, token count and stop
flag, leaves the global gradient in the buffer (W_embed's block included) and
returns the global scalars:

* :class:`LocalReducer`: one rank, nothing to send;
* :class:`DenseReducer`: scatter the embedding rows locally, one Allreduce of
  the whole buffer, one of the scalars;
* :class:`SparseEmbeddingReducer`: one small Allgather of (rows touched, loss,
  tokens, stop), an Allreduce of the dense prefix, and the (ids, rows) of every
  rank by Allgatherv, summed in rank order (so identically on every rank);
* :class:`AutoReducer`: the same Allgather, then dense or sparse for this step,
  whichever moves fewer bytes (:func:`choose_embedding_mode`, the one place
  that decision is taken).

Two options change how the dense part travels, never what is summed:

* ``early=(lo, hi)`` (``--overlap-reduce``): that contiguous part of the buffer
  (W_vocab's and b_vocab's gradients, final before backpropagation through time)
  is reduced by a nonblocking Allreduce started by :meth:`Reducer.start_early`
  from inside the backward pass; the rest is reduced as before, then the early
  part is waited for. The same sums, so the same bits as one Allreduce (tested);
  a rank whose pass never called it (no token) starts it when the reduction
  begins, so every rank starts the same collectives in the same order;
* ``reduce_dtype="bf16"`` (``--reduce-dtype bf16``): the dense Allreduce sends
  bf16 and sums in float32 on arrival (``Communicator.allreduce_sum_bf16_``,
  within ``BF16_SUM_BOUND`` of the exact sum); the embedding rows stay float32.

The reducer knows the communicator and the gradient's layout, nothing of the
model. Micro-shards are summed before a reducer sees them (accumulate.py); the
fixed-point sums of ``--deterministic`` reduce their integers themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module, to_host

EMBED_MODES = ("auto", "dense", "sparse")
REDUCE_DTYPES = ("fp32", "bf16")


@dataclass
class Reduced:
    """The global result of one step's reduction."""

    loss: object  # float (a 0-d device array when nothing was reduced on the GPU)
    tokens: float
    stop: bool
    mode: str  # "local", "dense" or "sparse"
    bytes: int  # estimated bytes this rank sent plus received
    seconds: float  # wall time spent in the reduction


def ring_bytes(size: int, nbytes: int, passes: int) -> int:
    """Bytes a rank sends plus receives in ``passes`` ring passes over ``nbytes``."""
    return int(2 * passes * (size - 1) * nbytes // size) if size > 1 else 0


def embedding_bytes(size: int, total_rows: int, vocab: int, width: int, itemsize: int) -> dict:
    """Estimated bytes one rank sends plus receives for each embedding strategy.

    dense: a ring Allreduce of the (V, W) gradient, 2 * 2(p-1)/p * V*W*itemsize.
    sparse: a ring Allgatherv of ``total_rows`` rows (summed over ranks) of
    W*itemsize bytes plus an 8-byte id, 2(p-1)/p * rows * (W*itemsize + 8).
    Sparse wins until the ranks together touch about 2V rows.
    """
    return {"dense": ring_bytes(size, vocab * width * itemsize, 2),
            "sparse": ring_bytes(size, total_rows * (width * itemsize + 8), 1)}


def choose_embedding_mode(size: int, counts, vocab: int, width: int, itemsize: int) -> str:
    """"sparse" or "dense" for this step, from every rank's row count (the same on every rank)."""
    est = embedding_bytes(size, int(np.sum(counts)), vocab, width, itemsize)
    return "sparse" if est["sparse"] < est["dense"] else "dense"


class Reducer:
    """Base: the communicator, bucketing of the dense Allreduce, and the shared pieces."""

    mode = "?"

    def __init__(self, comm, buckets: int = 1, reduce_dtype: str = "fp32", early=None):
        self.comm = comm
        self.buckets = max(1, int(buckets))
        self.reduce_dtype = reduce_dtype
        self.early = None if early is None else (int(early[0]), int(early[1]))
        self.pending = None  # the early part's PendingSum, between start_early and reduce
        self.early_in_pass = 0  # steps whose early part started inside the pass
        self.early_done_before_wait = 0  # ... and had completed before the reduction waited

    def start_early(self, grad_buffer) -> None:
        """Start the nonblocking sum of the early part (called once per step, from the pass,
        when that part of ``grad_buffer`` is final)."""
        if self.early is None or self.pending is not None:
            return
        lo, hi = self.early
        self.pending = self.comm.iallreduce_sum_(grad_buffer[lo:hi])

    def reduce(self, grads, loss, tokens, stop) -> Reduced:
        t0 = time.perf_counter()
        if self.early is not None:
            if self.pending is None:  # this rank's pass never got there: start it now
                self.start_early(grads.grad_buffer)
            else:
                self.early_in_pass += 1
        loss, tokens, stop, mode, nbytes = self._reduce(grads, loss, tokens, stop)
        return Reduced(loss, tokens, bool(stop), mode, int(nbytes), time.perf_counter() - t0)

    def _reduce(self, grads, loss, tokens, stop):
        raise NotImplementedError

    # ---- pieces
    def _sum(self, buf, buckets=1):
        if self.reduce_dtype == "bf16" and buf.dtype == np.float32:
            self.comm.allreduce_sum_bf16_(buf)
            return ring_bytes(self.comm.size, buf.nbytes // 2, 2)
        self.comm.allreduce_sum_(buf, buckets=buckets)
        return ring_bytes(self.comm.size, buf.nbytes, 2)

    def _allreduce_dense(self, grads, upto=None):
        buf = grads.grad_buffer if upto is None else grads.grad_buffer[:upto]
        if self.early is None:
            return self._sum(buf, self.buckets)
        lo, hi = self.early
        nbytes = self._sum(buf[:lo], self.buckets)
        if hi < buf.shape[0]:
            nbytes += self._sum(buf[hi:])
        pending, self.pending = self.pending, None
        pending.wait()
        self.early_done_before_wait += int(pending.completed_early)
        return nbytes + ring_bytes(self.comm.size, pending.nbytes, 2)

    def _gather_meta(self, grads, loss, tokens, stop):
        """One Allgather: every rank's (embedding rows, loss, tokens, stop)."""
        return self.comm.allgather_scalars([grads.embed_ids.shape[0], float(loss), tokens,
                                            float(stop)])

    def _sparse_embedding(self, grads, counts):
        """Every rank's (ids, rows) by Allgatherv, summed into W_embed's block in rank order."""
        comm, out = self.comm, grads.embed_grad
        xp = get_array_module(out)
        ids = to_host(grads.embed_ids).astype(np.int64, copy=False)
        rows = np.ascontiguousarray(to_host(grads.embed_rows))
        all_ids = comm.allgatherv_rows(np.ascontiguousarray(ids), counts)
        all_rows = comm.allgatherv_rows(rows, counts)
        if xp is not np:
            all_ids, all_rows = xp.asarray(all_ids), xp.asarray(all_rows)
        out.fill(0)
        start = 0
        for c in counts.tolist():  # rank order on every rank: bitwise identical sums
            if c:
                out[all_ids[start : start + c]] += all_rows[start : start + c]
            start += c
        V, W = out.shape
        return embedding_bytes(comm.size, int(counts.sum()), V, W, out.dtype.itemsize)["sparse"]

    @staticmethod
    def _sum_meta(meta):
        """Global (loss, tokens, stop), summed in rank order (the same on every rank)."""
        return float(meta[:, 1].sum()), float(meta[:, 2].sum()), bool(meta[:, 3].any())


class LocalReducer(Reducer):
    """One rank: the local gradient is the global one."""

    mode = "local"

    def _reduce(self, grads, loss, tokens, stop):
        grads.scatter_embedding()
        return loss, tokens, stop, "local", 0


class DenseReducer(Reducer):
    """The embedding gradient scattered densely, then one fused Allreduce of everything."""

    mode = "dense"

    def _reduce(self, grads, loss, tokens, stop):
        grads.scatter_embedding()
        nbytes = self._allreduce_dense(grads)
        totals = self.comm.allreduce_scalars(np.array([float(loss), tokens, float(stop)]))
        return float(totals[0]), float(totals[1]), bool(totals[2] > 0), "dense", nbytes


class SparseEmbeddingReducer(Reducer):
    """The dense prefix by Allreduce, the embedding rows by Allgatherv."""

    mode = "sparse"

    def _reduce(self, grads, loss, tokens, stop):
        meta = self._gather_meta(grads, loss, tokens, stop)
        return (*self._sum_meta(meta), "sparse", self._sparse_step(grads, meta))

    def _sparse_step(self, grads, meta):
        counts = meta[:, 0].astype(np.int64)
        nbytes = self._allreduce_dense(grads, upto=grads.embed_offset)
        return nbytes + self._sparse_embedding(grads, counts)


class AutoReducer(SparseEmbeddingReducer):
    """Dense or sparse, chosen each step from the gathered row counts."""

    mode = "auto"

    def _reduce(self, grads, loss, tokens, stop):
        meta = self._gather_meta(grads, loss, tokens, stop)
        V, W = grads.embed_shape
        itemsize = grads.grad_buffer.dtype.itemsize
        mode = choose_embedding_mode(self.comm.size, meta[:, 0], V, W, itemsize)
        if mode == "dense":
            grads.scatter_embedding()
            nbytes = self._allreduce_dense(grads)
        else:
            nbytes = self._sparse_step(grads, meta)
        return (*self._sum_meta(meta), mode, nbytes)


def make_reducer(comm, embed_reduce: str = "auto", buckets: int = 1, reduce_dtype: str = "fp32",
                 early=None) -> Reducer:
    """The reducer for ``--embed-reduce`` and ``--reduce-dtype`` on this communicator;
    ``early``: the (lo, hi) part of the dense gradient to reduce during the pass, or None."""
    if embed_reduce not in EMBED_MODES:
        raise ValueError(f"--embed-reduce: expected one of {', '.join(EMBED_MODES)}, "
                         f"got {embed_reduce!r}")
    if reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(f"--reduce-dtype: expected one of {', '.join(REDUCE_DTYPES)}, "
                         f"got {reduce_dtype!r}")
    if comm.size == 1:
        return LocalReducer(comm, buckets)
    cls = {"auto": AutoReducer, "dense": DenseReducer,
           "sparse": SparseEmbeddingReducer}[embed_reduce]
    return cls(comm, buckets, reduce_dtype, early)
