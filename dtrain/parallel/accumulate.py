"""Gradient accumulation over micro-shards: one protocol, three versions.

A step runs this rank's rows as one or more micro-shards (rows of the global
batch, by position), one forward/backward pass each. Every version has the
same three calls per step:

    acc.start()
    acc.add(grads)            # once per micro-shard: the StepGrads of one pass
    reduced = acc.finish(stop)

``finish`` leaves the global gradient in the model's ``grad_buffer`` and
returns a :class:`~dtrain.parallel.reducer.Reduced` (global loss, tokens, stop
flag), or None when the micro-shards must be computed again (only the fixed-
point version asks, when its scales change). After ``finish``,
``local_finite`` says whether this rank's own loss and gradients were finite
before they were reduced: the step's finite check names the ranks from it.

* :class:`PassThrough`: one micro-shard; the model's gradients go to the
  reducer as they are.
* :class:`FloatAccumulator`: micro-shards summed in floating point, in
  micro-shard order, then reduced as one pass would be (``--micro-batch``).
* :class:`FixedPointAccumulator`: every micro-shard rounded to int64 fixed point
  and summed exactly, so the result is the same bits for every world size
  that divides the micro-shard count (``--deterministic``).

``all_finite(*arrays) -> bool`` is given by the step (the kernels' check where
there is one; ``finite_entries`` otherwise). The accumulators know the communicator and the
gradient's layout (from the StepGrads they are given), nothing of the model.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from ..backend import get_array_module, to_host
from .reducer import Reduced, choose_embedding_mode, embedding_bytes, ring_bytes


def finite_entries(*arrays) -> bool:
    """The plain check, for callers without the kernels' one: every entry finite."""
    return all(bool(get_array_module(a).isfinite(a).all()) for a in arrays if a.size)


class PassThrough:
    """One micro-shard: the pass's gradients are the rank's; the reducer sums them over ranks."""

    def __init__(self, reducer, all_finite=finite_entries):
        self.reducer, self.all_finite = reducer, all_finite
        self.mode = reducer.mode
        comm = reducer.comm
        # one rank: the step's global check sees the same numbers, no need to look twice
        self.check_local = comm is not None and comm.size > 1
        self.grads, self.local_finite = None, True

    def start(self):
        self.grads = None

    def add(self, grads):
        if self.grads is not None:
            raise ValueError("PassThrough takes one micro-shard per step (use FloatAccumulator)")
        self.grads = grads

    def finish(self, stop):
        grads, self.grads = self.grads, None
        self.local_finite = not self.check_local or local_finite(grads, self.all_finite)
        # a device scalar stays on the device (one GPU rank: read when logged), else a float
        loss = grads.loss if get_array_module(grads.loss) is not np else float(grads.loss)
        return self.reducer.reduce(grads, loss, grads.tokens, stop)

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


def local_finite(grads, all_finite) -> bool:
    """This rank's loss and gradients (dense part and embedding rows) are all finite."""
    return math.isfinite(float(grads.loss)) and all_finite(
        grads.grad_buffer[: grads.embed_offset], grads.embed_rows)


class FloatAccumulator(PassThrough):
    """Micro-shards summed in floating point (``--micro-batch`` alone).

    The dense gradients are summed in micro-shard order into a buffer of their
    own, the embedding rows into a dense (V, W) buffer (rows of words seen);
    ``finish`` hands the reducer one ``StepGrads`` as if one pass had run.
    """

    def __init__(self, reducer, all_finite=finite_entries):
        super().__init__(reducer, all_finite)
        self.dense = self.embed = self.touched = None

    def start(self):
        self.count, self.loss, self.tokens = 0, 0.0, 0

    def _buffers(self, grads):
        """Sums of this layout, zeroed (allocated once)."""
        xp = get_array_module(grads.grad_buffer)
        if self.dense is None or self.dense.shape[0] != grads.embed_offset:
            dtype = grads.grad_buffer.dtype
            self.dense = xp.zeros(grads.embed_offset, dtype=dtype)
            self.embed = xp.zeros(grads.embed_shape, dtype=dtype)
            self.touched = xp.zeros(grads.embed_shape[0], dtype=bool)
        self.dense.fill(0)
        self.embed.fill(0)
        self.touched.fill(False)

    def add(self, grads):
        if self.count == 0:
            self._buffers(grads)
        self.count += 1
        self.grads = grads
        self.loss += float(grads.loss)
        self.tokens += grads.tokens
        self.dense += grads.grad_buffer[: grads.embed_offset]
        if grads.embed_ids.shape[0]:
            ids = grads.embed_ids
            self.embed[ids] += grads.embed_rows  # ids are unique within a micro-shard
            self.touched[ids] = True

    def finish(self, stop):
        last, self.grads = self.grads, None
        last.grad_buffer[: last.embed_offset] = self.dense
        ids = get_array_module(self.touched).flatnonzero(self.touched)
        grads = dataclasses.replace(last, loss=self.loss, tokens=int(self.tokens), embed_ids=ids,
                                    embed_rows=self.embed[ids], embed_dense=False)
        self.local_finite = not self.check_local or local_finite(grads, self.all_finite)
        return self.reducer.reduce(grads, grads.loss, grads.tokens, stop)


# ---------------------------------------------------------------------------
# --deterministic: exact, order-independent sums of micro-shard gradients

FIXED_POINT_BITS = 62  # |sum| < 2^62: int64 with a bit to spare
HEADROOM_BITS = 6  # the scale leaves room for gradients 64x larger than the last step's


def _exponent(max_abs: float, total_micro: int, headroom: int) -> int:
    """Largest s with total_micro * max_abs * 2^s < 2^(FIXED_POINT_BITS - headroom)."""
    if not max_abs > 0 or not np.isfinite(max_abs):
        return 40 - int(np.ceil(np.log2(total_micro)))
    return int(np.floor(FIXED_POINT_BITS - headroom - np.log2(total_micro) - np.log2(max_abs))) - 1


class FixedPointAccumulator:
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
    again with the scale from its own maximum: ``finish`` then returns None. The
    error against the exact sum is at most M/2 * 2^-s per entry, about
    2^-(62 - 6 - log2 M) of the parameter's largest micro-shard gradient
    (docs/determinism.md). A non-finite gradient on any rank is never rounded
    into the sums unnoticed: the step's gradient becomes NaN (not applied), and
    ``local_finite`` names the ranks.
    """

    mode = "deterministic"

    def __init__(self, comm, segments, total_micro, embed_reduce, all_finite, kernels=None):
        self.comm = comm
        self.segments = list(segments)  # (name, start, stop), W_embed last
        self.total_micro = int(total_micro)
        self.embed_reduce = embed_reduce
        self.all_finite = all_finite
        self.kernels = kernels
        self.exps = None  # per-segment exponent s, from the previous step
        self._acc = None
        self.local_finite = True

    def state_dict(self):
        """The fixed-point scales: a resumed run must round exactly as the uninterrupted one."""
        return {"exps": None if self.exps is None else [int(e) for e in self.exps]}

    def load_state_dict(self, state):
        exps = (state or {}).get("exps")
        self.exps = None if exps is None else [int(e) for e in exps]

    # ---- per step: start, add each micro-shard, finish
    def start(self):
        self.count, self.losses, self.tokens, self.overflow = 0, [], 0, False
        self.local_finite = True
        self.local_max = np.zeros(len(self.segments))
        self.seconds = 0.0

    def _buffers(self, grads):
        """The integer sums for this layout, zeroed (allocated once)."""
        xp = get_array_module(grads.grad_buffer)
        n_dense = self.segments[-1][1]
        if self._acc is None or self._acc.shape[0] != n_dense:
            self._acc = xp.zeros(n_dense, dtype=np.int64)
            self._acc_embed = xp.zeros(grads.embed_shape, dtype=np.int64)
            self._touched = xp.zeros(grads.embed_shape[0], dtype=bool)
            self._scratch = xp.empty(n_dense, dtype=np.float64)
        self._acc.fill(0)
        self._acc_embed.fill(0)
        self._touched.fill(False)
        self.grad_buffer, self.embed_shape = grads.grad_buffer, grads.embed_shape

    def add(self, grads):
        """Round one micro-shard's gradient (``StepGrads``) to fixed point and add it."""
        t0 = time.perf_counter()
        if self.count == 0:
            self._buffers(grads)
        self.count += 1
        self.losses.append(float(grads.loss))
        self.tokens += int(grads.tokens)
        # the rounding would turn a NaN into an integer: look before rounding
        self.local_finite = self.local_finite and local_finite(grads, self.all_finite)
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

    def finish(self, stop):
        """The global gradient into ``grad_buffer`` and a :class:`Reduced`, or None when
        the step must be computed again with the scales now set (first step, overflow)."""
        t0 = time.perf_counter()
        comm, S = self.comm, len(self.segments)
        touched = int(self._touched.sum())
        row = [touched, self.tokens, float(stop), float(self.overflow),
               float(not self.local_finite), *self.local_max, *self.losses]
        meta = comm.allgather_scalars(row)
        global_max = meta[:, 5 : 5 + S].max(axis=0)
        finite = not bool(meta[:, 4].any())
        # some micro-shard outgrew its scale: redo, exact scales
        if finite and bool(meta[:, 3].any()):
            self.exps = [_exponent(m, self.total_micro, 0) for m in global_max]
            return None
        nbytes, mode = self._exchange(meta[:, 0].astype(np.int64))
        if finite:
            self._to_float()
            self.exps = [_exponent(m, self.total_micro, HEADROOM_BITS) for m in global_max]
        else:  # not applied: the step's finite check stops the run and names the ranks
            self.grad_buffer.fill(np.nan)
        loss = 0.0
        for value in meta[:, 5 + S :].reshape(-1):  # micro-shard order, whatever the world size
            loss += float(value)
        tokens = float(meta[:, 1].sum())  # integers: exact
        seconds = self.seconds + time.perf_counter() - t0
        return Reduced(loss, tokens, bool(meta[:, 2].any()), f"deterministic-{mode}", int(nbytes),
                       seconds)

    def _exchange(self, counts):
        """Sum the integer sums over ranks (exact, any order); (bytes moved, embedding mode)."""
        comm = self.comm
        nbytes = 0
        if comm.size > 1:
            comm.allreduce_sum_(self._acc)
            nbytes += ring_bytes(comm.size, self._acc.nbytes, 2)
        V, W = self.embed_shape
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
        return nbytes, mode

    def _to_float(self):
        """Back to floating point: q * 2^-s, rounded once to the buffer's dtype
        (int64 -> float64 rounds once, 2^-s is exact, the store rounds once: one pass each)."""
        xp, g, S = get_array_module(self.grad_buffer), self.grad_buffer, len(self.segments)
        for j, (_, lo, hi) in enumerate(self.segments):
            q = self._acc[lo:hi] if j < S - 1 else self._acc_embed.reshape(-1)
            xp.multiply(q, 2.0 ** -self.exps[j], out=g[lo:hi], casting="unsafe")
