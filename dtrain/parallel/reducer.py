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

The reducer knows the communicator and the gradient's layout, nothing of the
model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module, to_host

EMBED_MODES = ("auto", "dense", "sparse")


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

    def __init__(self, comm, buckets: int = 1):
        self.comm = comm
        self.buckets = max(1, int(buckets))

    def reduce(self, grads, loss, tokens, stop) -> Reduced:
        t0 = time.perf_counter()
        loss, tokens, stop, mode, nbytes = self._reduce(grads, loss, tokens, stop)
        return Reduced(loss, tokens, bool(stop), mode, int(nbytes), time.perf_counter() - t0)

    def _reduce(self, grads, loss, tokens, stop):
        raise NotImplementedError

    # ---- pieces
    def _allreduce_dense(self, grads, upto=None):
        buf = grads.grad_buffer if upto is None else grads.grad_buffer[:upto]
        self.comm.allreduce_sum_(buf, buckets=self.buckets)
        return ring_bytes(self.comm.size, buf.nbytes, 2)

    def _gather_meta(self, grads, loss, tokens, stop):
        """One Allgather: every rank's (embedding rows, loss, tokens, stop)."""
        return self.comm.allgather_scalars([grads.embed_ids.shape[0], float(loss), tokens, float(stop)])

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


def make_reducer(comm, embed_reduce: str = "auto", buckets: int = 1, deterministic=False,
                 segments=None, total_micro=1, kernels=None) -> Reducer:
    """The reducer for ``--embed-reduce`` (and ``--deterministic``) on this communicator."""
    if deterministic:
        return DeterministicReducer(comm, segments, total_micro, embed_reduce, kernels)
    if embed_reduce not in EMBED_MODES:
        raise ValueError(f"--embed-reduce: expected one of {', '.join(EMBED_MODES)}, got {embed_reduce!r}")
    if comm.size == 1:
        return LocalReducer(comm, buckets)
    cls = {"auto": AutoReducer, "dense": DenseReducer, "sparse": SparseEmbeddingReducer}[embed_reduce]
    return cls(comm, buckets)


# ---------------------------------------------------------------------------
# --deterministic: exact, order-independent sums of micro-shard gradients

FIXED_POINT_BITS = 62  # |sum| < 2^62: int64 with a bit to spare
HEADROOM_BITS = 6  # the scale leaves room for gradients 64x larger than the last step's


def _exponent(max_abs: float, total_micro: int, headroom: int) -> int:
    """Largest s with total_micro * max_abs * 2^s < 2^(FIXED_POINT_BITS - headroom)."""
    if not max_abs > 0 or not np.isfinite(max_abs):
        return 40 - int(np.ceil(np.log2(total_micro)))
    return int(np.floor(FIXED_POINT_BITS - headroom - np.log2(total_micro) - np.log2(max_abs))) - 1


class DeterministicReducer(Reducer):
    """Bitwise identical results for every world size (``--deterministic``).

    Each micro-shard's gradient (the same rows and shapes whatever the number of
    ranks) is rounded to int64 fixed point, ``q = rint(g * 2^s)``, with one power-
    of-two scale ``2^s`` per parameter, and summed as integers: exactly, so in any
    order. One Allreduce of the int64 sums (and the embedding rows, exact too)
    gives every rank the same integers for any world size; ``q * 2^-s`` is the
    gradient. The loss of every micro-shard travels in the one small Allgather
    (rank order is micro-shard order) and is summed in that order.

    The scale of a parameter comes from the largest |g| of the previous step over
    all micro-shards (a MAX, exact), with HEADROOM_BITS to spare. A step whose
    gradients outgrow it (and the first step, with no previous one) is computed
    again with the scale from its own maximum: ``reduce`` then returns None. The
    error against the exact sum is at most M/2 * 2^-s per entry, about
    2^-(62 - 6 - log2 M) of the parameter's largest micro-shard gradient
    (docs/determinism.md).
    """

    mode = "deterministic"

    def __init__(self, comm, segments, total_micro, embed_reduce="auto", kernels=None):
        super().__init__(comm)
        self.segments = list(segments)  # (name, start, stop), W_embed last
        self.total_micro = int(total_micro)
        self.embed_reduce = embed_reduce
        self.kernels = kernels
        self.exps = None  # per-segment exponent s, from the previous step
        self._acc = None

    def state_dict(self):
        """The fixed-point scales: a resumed run must round exactly as the uninterrupted one."""
        return {"exps": None if self.exps is None else [int(e) for e in self.exps]}

    def load_state_dict(self, state):
        exps = (state or {}).get("exps")
        self.exps = None if exps is None else [int(e) for e in exps]

    # ---- per step: start, add each micro-shard, reduce
    def start(self, grad_buffer, embed_shape):
        xp = get_array_module(grad_buffer)
        n_dense = self.segments[-1][1]
        if self._acc is None or self._acc.shape[0] != n_dense:
            self._acc = xp.zeros(n_dense, dtype=np.int64)
            self._acc_embed = xp.zeros(embed_shape, dtype=np.int64)
            self._touched = xp.zeros(embed_shape[0], dtype=bool)
            self._scratch = xp.empty(n_dense, dtype=np.float64)
        self._acc.fill(0)
        self._acc_embed.fill(0)
        self._touched.fill(False)
        self.grad_buffer, self.embed_shape = grad_buffer, embed_shape
        self.losses, self.tokens, self.overflow = [], 0, False
        self.local_max = np.zeros(len(self.segments))
        self.seconds = 0.0

    def add(self, grads):
        """Round one micro-shard's gradient (``StepGrads``) to fixed point and add it."""
        t0 = time.perf_counter()
        self.losses.append(float(grads.loss))
        self.tokens += int(grads.tokens)
        exps = self.exps if self.exps is not None else [0] * len(self.segments)
        for j, (_, lo, hi) in enumerate(self.segments[:-1]):
            m = self._quantize(self._acc[lo:hi], grads.grad_buffer[lo:hi], 2.0 ** exps[j])
            self._note(j, m, exps[j])
        j = len(self.segments) - 1
        ids = grads.embed_ids
        if ids.shape[0]:
            m = self._quantize_rows(ids, grads.embed_rows, 2.0 ** exps[j])
            self._note(j, m, exps[j])
            self._touched[ids] = True
        self.seconds += time.perf_counter() - t0

    def _note(self, j, max_abs, exp):
        self.local_max[j] = max(self.local_max[j], max_abs)
        limit = 2.0 ** FIXED_POINT_BITS / self.total_micro
        if self.exps is None or not max_abs * 2.0**exp < limit:
            self.overflow = True

    def _quantize(self, acc, g, scale):
        if self.kernels is not None and hasattr(self.kernels, "quantize_add"):
            return self.kernels.quantize_add(acc, g, scale)
        xp = get_array_module(g)
        f = self._scratch[: g.shape[0]]
        xp.multiply(g, scale, out=f)
        xp.rint(f, out=f)
        acc += f.astype(np.int64)
        return float(xp.abs(g).max()) if g.shape[0] else 0.0

    def _quantize_rows(self, ids, rows, scale):
        if self.kernels is not None and hasattr(self.kernels, "quantize_add_rows"):
            return self.kernels.quantize_add_rows(self._acc_embed, ids, rows, scale)
        xp = get_array_module(rows)
        q = xp.rint(rows.astype(np.float64) * scale).astype(np.int64)
        self._acc_embed[ids] += q
        return float(xp.abs(rows).max())

    def reduce(self, stop):
        """The global gradient into ``grad_buffer`` and a :class:`Reduced`, or None when
        the step must be computed again with the scales now set (first step, overflow)."""
        t0 = time.perf_counter()
        comm, S = self.comm, len(self.segments)
        touched = int(self._touched.sum())
        row = [touched, self.tokens, float(stop), float(self.overflow), *self.local_max, *self.losses]
        meta = comm.allgather_scalars(row)
        global_max = meta[:, 4 : 4 + S].max(axis=0)
        if bool(meta[:, 3].any()):  # some micro-shard outgrew its scale: redo with exact scales
            self.exps = [_exponent(m, self.total_micro, 0) for m in global_max]
            return None
        nbytes = 0
        if comm.size > 1:
            comm.allreduce_sum_(self._acc)
            nbytes += ring_bytes(comm.size, self._acc.nbytes, 2)
        V, W = self.embed_shape
        counts = meta[:, 0].astype(np.int64)
        mode = self.embed_reduce
        if mode == "auto":
            mode = choose_embedding_mode(comm.size, counts, V, W, 8)
        total_embed = self._acc_embed
        if comm.size > 1 and mode == "dense":
            comm.allreduce_sum_(total_embed.reshape(-1))
            nbytes += embedding_bytes(comm.size, int(counts.sum()), V, W, 8)["dense"]
        elif comm.size > 1:
            xp = get_array_module(total_embed)
            ids = to_host(xp.flatnonzero(self._touched)).astype(np.int64)
            rows = np.ascontiguousarray(to_host(total_embed[ids]))
            all_ids = comm.allgatherv_rows(ids, counts)
            all_rows = comm.allgatherv_rows(rows, counts)
            # integers: the sum is exact whatever the order; np.add.at handles repeated ids
            total = np.zeros((V, W), dtype=np.int64)
            np.add.at(total, all_ids, all_rows)
            total_embed[...] = total if xp is np else xp.asarray(total)
            nbytes += embedding_bytes(comm.size, int(counts.sum()), V, W, 8)["sparse"]
        # back to floating point: q * 2^-s, rounded once to the buffer's dtype
        # (int64 -> float64 rounds once, 2^-s is exact, the store rounds once: one pass each)
        xp, g = get_array_module(self.grad_buffer), self.grad_buffer
        for j, (_, lo, hi) in enumerate(self.segments):
            q = self._acc[lo:hi] if j < S - 1 else total_embed.reshape(-1)
            xp.multiply(q, 2.0 ** -self.exps[j], out=g[lo:hi], casting="unsafe")
        loss = 0.0
        for value in meta[:, 4 + S :].reshape(-1):  # micro-shard order, whatever the world size
            loss += float(value)
        tokens = float(meta[:, 1].sum())  # integers: exact
        self.exps = [_exponent(m, self.total_micro, HEADROOM_BITS) for m in global_max]
        seconds = self.seconds + time.perf_counter() - t0
        return Reduced(loss, tokens, bool(meta[:, 2].any()), f"deterministic-{mode}", int(nbytes), seconds)
