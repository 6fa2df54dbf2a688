"""Layers shared by every cell: pure forward/backward pairs and the packed core.

Signatures follow CS231n assignment 3 (the "Numerical contract" of the
project's design notes). Every function is written once against the array
module ``xp`` of its inputs, so it runs unchanged on NumPy and CuPy. The
recurrent cells themselves (RNN, LSTM, GRU) live in ``dtrain.nn.cells``, one
module each; this module holds what they share:

* the *packed* time-major layout (like a packed sequence): at step t only the
  first ``batch_sizes[t]`` rows of a length-sorted batch are still inside a
  caption, so the input projection of every (row, t) that matters is one GEMM
  (``input_projection``), and the weight gradients come from one GEMM each
  after the loop (``weight_grads``);
* the CS231n full-sequence wrappers (every row active for all T steps);
* word embedding, temporal affine and the (masked) softmax loss.

Buffers may come from a :class:`Workspace`, so a training step that calls the
packed functions with the same shapes allocates nothing after the first call.
"""

from __future__ import annotations

import math

import numpy as np

from .. import alloc
from ..backend import get_array_module


class Workspace:
    """Named scratch buffers that are reused across calls (grown on demand).

    The views handed out are remembered by (name, shape, dtype): a training step
    asks for the same ones every time, and a lookup costs a dict access instead of
    building a view (measured: 0.45 -> 0.25 ms for a step's ~25 requests, zero
    fills included, whose Python runs on caches the GEMMs have just filled).
    """

    MAX_VIEWS = 4096  # forgotten beyond this (batches of many different lengths)

    def __init__(self):
        self._buffers = {}
        self._views = {}
        self._zeroed = {}  # buffer key -> the buffer zeros() filled (a grown one is new)

    def zeros(self, name, shape, dtype, xp=np):
        """A buffer of zeros that its users only read: zeroed when (re)allocated, not on every
        call (a step's zero state, e.g. the LSTM's c0). Its name must not serve anything else."""
        out = self.get(name, shape, dtype, xp)
        key = (name, np.dtype(dtype).str, xp.__name__)
        if self._zeroed.get(key) is not self._buffers[key]:
            self._buffers[key].fill(0)
            self._zeroed[key] = self._buffers[key]
        return out

    def get(self, name, shape, dtype, xp=np, zero=False):
        try:
            out = self._views[(name, shape, dtype, xp)]
        except (KeyError, TypeError):  # new, or an unhashable shape (a list)
            out = self._view(name, shape, dtype, xp)
        if zero:
            out.fill(0)
        return out

    def _view(self, name, shape, dtype, xp):
        request = (name, shape, dtype, xp)
        shape = tuple(int(s) for s in shape)
        size = math.prod(shape)
        dt = np.dtype(dtype)
        key = (name, dt.str, xp.__name__)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = alloc.empty(max(size, 1), dt, xp)
            self._buffers[key] = buf
            self._views.clear()  # views of the old buffer of this name
        out = buf[:size].reshape(shape)
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()
        try:
            self._views[request] = out
        except TypeError:
            pass
        return out



def buffer(ws, name, shape, dtype, xp, zero=False):
    if ws is None:
        return alloc.zeros(shape, dtype, xp) if zero else alloc.empty(shape, dtype, xp)
    return ws.get(name, shape, dtype, xp, zero=zero)


def zeros_buffer(ws, name, shape, dtype, xp):
    """Zeros that the caller only reads: on the host, from ``ws.zeros`` (filled once); on a
    GPU filled on every call (a captured CUDA graph replays the fill)."""
    if ws is None or xp is not np:
        return buffer(ws, name, shape, dtype, xp, zero=True)
    return ws.zeros(name, shape, dtype, xp)


# ---------------------------------------------------------------------------
# Stable nonlinearities


def sigmoid(x, out=None):
    """Logistic sigmoid through one tanh: 0.5 * (1 + tanh(x / 2)).

    tanh saturates to +-1 without overflow, so this is stable for any finite
    input (no exp of a large number, no masked branches) and costs one
    transcendental per element.
    """
    xp = get_array_module(x)
    out = xp.multiply(x, 0.5, out=out)
    xp.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


def softmax_rows(x, out=None):
    """Row-wise softmax with the max subtracted first (no overflow)."""
    xp = get_array_module(x)
    out = xp.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    xp.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return out


# ---------------------------------------------------------------------------
# Packed sequence core (the fast path)


def packed_offsets(batch_sizes):
    """Start offset of each time step's block in the packed layout."""
    offsets = [0]
    for n in batch_sizes:
        offsets.append(offsets[-1] + int(n))
    return offsets


def check_batch_sizes(batch_sizes, total):
    for t in range(1, len(batch_sizes)):
        if batch_sizes[t] > batch_sizes[t - 1]:
            raise ValueError("batch_sizes must be non-increasing (rows sorted by length)")
    if sum(batch_sizes) != total:
        raise ValueError(f"packed input has {total} rows, batch_sizes sum to {sum(batch_sizes)}")


def input_projection(x_packed, Wx, b, out):
    """out = x_packed @ Wx + b: the input projection of every step, one GEMM
    (b None: left to the caller)."""
    xp = get_array_module(x_packed)
    xp.matmul(x_packed, Wx, out=out)
    if b is not None:
        out += b
    return out


# Up to this many rows, recurrent_backward computes (Wh @ d.T).T (measured crossover
# between 128 and 192 rows, H=512, OpenBLAS SkylakeX, 2 threads; above it the extra
# transposing copy costs what the GEMM gains).
TRANSPOSED_BACKWARD_ROWS = 128


def recurrent_scratch(ws, rows, H, dtype, xp):
    """The scratch buffer of ``recurrent_backward`` for up to ``rows`` rows (None on a GPU).

    A packed backward pass takes it once, before its time loop: every Python
    call inside the loop runs once per time step, on caches the GEMMs have just
    filled with other data (measured: a workspace lookup there costs 18 us).
    """
    if xp is not np:
        return None
    return buffer(ws, "recurrent_backward_T", (H * max(min(rows, TRANSPOSED_BACKWARD_ROWS), 1),), dtype, xp)


def recurrent_backward(d, Wh, out, ws=None, scratch=None, kernels=None):
    """out = d @ Wh.T: a step's gradient back to the previous hidden state.

    On NumPy, for at most TRANSPOSED_BACKWARD_ROWS rows, this is computed as
    (Wh @ d.T).T into a scratch buffer (``scratch`` from ``recurrent_scratch``,
    else one from ``ws``) and copied: OpenBLAS runs that form 1.6x to 2.4x
    faster for the few rows (n <= 32) of a short caption batch's step, and
    1.05x to 1.4x at n = 128. Same products; at the model's sizes the results
    were bitwise equal (H=512, n=4..512), and tests/test_layers.py checks them
    against the plain product. ``kernels`` that offer ``copy_transposed`` do the
    copy.
    """
    n, H = out.shape
    gemm_transposed = getattr(kernels, "gemm_transposed", None) if isinstance(d, np.ndarray) else None
    if not isinstance(d, np.ndarray) or n > TRANSPOSED_BACKWARD_ROWS:
        if gemm_transposed is not None:
            return gemm_transposed(d, Wh, out)
        return get_array_module(d).matmul(d, Wh.T, out=out)
    if scratch is None:
        scratch = buffer(ws, "recurrent_backward_T", (H * max(n, 1),), d.dtype, np)
    out_T = recurrent_backward_T(d, Wh, scratch, kernels)
    copy_transposed = getattr(kernels, "copy_transposed", None)
    if copy_transposed is not None:  # OpenBLAS's omatcopy: 3-5x NumPy's transposing copy
        return copy_transposed(out_T, out)
    out[...] = out_T.T
    return out


def recurrent_backward_T(d, Wh, scratch, kernels=None):
    """(d @ Wh.T).T = Wh @ d.T, (H, n), in ``scratch`` (NumPy): ``recurrent_backward``'s
    GEMM, for kernels that read the result transposed (``backward_reads_transposed``).
    ``kernels`` that offer ``gemm_transposed`` run it (the call the compiled loops make)."""
    n, H = d.shape[0], Wh.shape[0]
    out_T = scratch[: H * n].reshape(H, n)
    gemm_transposed = getattr(kernels, "gemm_transposed", None)
    if gemm_transposed is not None:
        return gemm_transposed(Wh, d, out_T)
    np.matmul(Wh, d.T, out=out_T)
    return out_T


def prev_h_packed(H_packed, h0, batch_sizes, offsets, out, kernels=None):
    """Rows h_{t-1}[:n_t] of every step, stacked in packed order.

    dWh is then one GEMM, prev_h_packed.T @ da_packed, after the loop. ``kernels``
    that offer ``prev_h_rows`` copy them in one call (on every thread of the pool).
    """
    fused = getattr(kernels, "prev_h_rows", None)
    if fused is not None and isinstance(out, np.ndarray):
        return fused(H_packed, h0, offsets, out)
    n0 = batch_sizes[0]
    out[:n0] = h0[:n0]
    for t in range(1, len(batch_sizes)):
        n = batch_sizes[t]
        out[offsets[t] : offsets[t] + n] = H_packed[offsets[t - 1] : offsets[t - 1] + n]
    return out


def weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws, da_h=None, input_grad=True):
    """dWx, dWh, db and dx from the packed pre-activation gradients: one GEMM each.

    ``da`` is the gradient of the input pre-activations (x Wx + b); ``da_h``
    that of the recurrent ones (h Wh) where a cell makes them differ (GRU),
    else ``da`` serves both. ``out`` = (dWx, dWh, db) arrays to write into
    (views of a flat gradient buffer), or None to allocate. With
    ``input_grad=False`` the dx GEMM and db are left to the caller: ``da``
    itself is returned in dx's place (the model sums it per word first, so its
    GEMM has one row per distinct word instead of one per position, and takes
    db = da.sum(axis=0) from the same pass), and db is not written.
    """
    xp = get_array_module(da)
    if out is None:
        out = (
            xp.empty((x_packed.shape[1], da.shape[1]), dtype=da.dtype),
            xp.empty((prev_h.shape[1], da.shape[1]), dtype=da.dtype),
            xp.empty((da.shape[1],), dtype=da.dtype),
        )
    dWx, dWh, db = out
    xp.matmul(x_packed.T, da, out=dWx)
    xp.matmul(prev_h.T, da if da_h is None else da_h, out=dWh)
    if not input_grad:
        return da, dh0, dWx, dWh, db
    da.sum(axis=0, out=db)
    dx_packed = buffer(ws, "dx_packed", (da.shape[0], Wx.shape[0]), da.dtype, xp)
    xp.matmul(da, Wx.T, out=dx_packed)
    return dx_packed, dh0, dWx, dWh, db


# ---------------------------------------------------------------------------
# CS231n sequence signatures: batch-major (N, T, .), every row active all T steps


def _to_packed(x):
    """(N, T, D) batch-major -> (T*N, D) time-major packed (all rows active)."""
    xp = get_array_module(x)
    N, T, D = x.shape
    return xp.ascontiguousarray(x.transpose(1, 0, 2)).reshape(T * N, D)


def _from_packed(p, N, T):
    xp = get_array_module(p)
    return xp.ascontiguousarray(p.reshape(T, N, -1).transpose(1, 0, 2))


def full_sequence_forward(packed_forward, x, h0, Wx, Wh, b):
    N, T, _ = x.shape
    Hp, core = packed_forward(_to_packed(x), h0, Wx, Wh, b, [N] * T)
    return _from_packed(Hp, N, T), (core, N, T)


def full_sequence_backward(packed_backward, dh, cache):
    core, N, T = cache
    dx_p, dh0, dWx, dWh, db = packed_backward(_to_packed(dh), core)
    return _from_packed(dx_p, N, T), dh0, dWx, dWh, db


# ---------------------------------------------------------------------------
# Word embedding


def word_embedding_forward(x, W):
    """out[n, t] = W[x[n, t]] for integer word ids x of any shape."""
    xp = get_array_module(W)
    out = xp.take(W, x, axis=0)
    return out, (x, W.shape)


def embedding_grad_sparse(words, dout, kernels=None, vocab_size=None, col_sum=None):
    """Row-sparse embedding gradient: (unique word ids ascending, summed rows).

    ``words`` (M,) ids, ``dout`` (M, W) the gradients of their embeddings.
    Sorting the ids groups equal words, so each row sum is one segment
    reduction (no np.add.at, which is slow on the CPU). With ``kernels`` that
    offer it (and ``vocab_size``), a counting sort and one pass sum the rows
    instead (the same sums, in position order; results are the kernel's buffers).
    ``col_sum`` (W,), when given, receives ``dout.sum(axis=0)`` (the kernel
    takes it from the same pass, as the sums of the rows in blocks of words).
    """
    xp = get_array_module(dout)
    words = words.reshape(-1)
    dout = dout.reshape(words.shape[0], -1)
    fused = getattr(kernels, "embedding_grad_sparse", None)
    if fused is not None and vocab_size is not None and words.shape[0]:
        return fused(words, dout, vocab_size, col_sum)
    if col_sum is not None:
        dout.sum(axis=0, out=col_sum)
    if words.shape[0] == 0:
        return xp.zeros(0, dtype=np.int64), dout[:0].copy()
    order = xp.argsort(words, kind="stable")
    sorted_words = words[order]
    starts = xp.concatenate(
        [xp.zeros(1, dtype=np.int64), xp.flatnonzero(sorted_words[1:] != sorted_words[:-1]) + 1]
    )
    ids = sorted_words[starts].astype(np.int64)
    if xp is np:
        rows = np.add.reduceat(dout[order], starts, axis=0)
    else:  # CuPy has no reduceat: scatter-add into the unique slots
        slot = xp.cumsum(xp.concatenate([xp.zeros(1, dtype=np.int64), (sorted_words[1:] != sorted_words[:-1]).astype(np.int64)]))
        rows = xp.zeros((ids.shape[0], dout.shape[1]), dtype=dout.dtype)
        xp.add.at(rows, slot, dout[order])
    return ids, rows


def word_embedding_backward(dout, cache, sparse=False):
    """dW (V, W) dense, or (ids, rows) row-sparse when ``sparse``."""
    x, w_shape = cache
    ids, rows = embedding_grad_sparse(x, dout)
    if sparse:
        return ids, rows
    xp = get_array_module(dout)
    dW = xp.zeros(w_shape, dtype=dout.dtype)
    dW[ids] = rows
    return dW


# ---------------------------------------------------------------------------
# Temporal affine and masked softmax loss


def temporal_affine_forward(x, w, b):
    N, T, D = x.shape
    out = (x.reshape(N * T, D) @ w).reshape(N, T, -1) + b
    return out, (x, w, b)


def temporal_affine_backward(dout, cache):
    x, w, b = cache
    N, T, D = x.shape
    M = dout.shape[2]
    d2 = dout.reshape(N * T, M)
    dx = (d2 @ w.T).reshape(N, T, D)
    dw = x.reshape(N * T, D).T @ d2
    db = d2.sum(axis=0)
    return dx, dw, db


def softmax_cross_entropy(scores, targets, normalizer, dscores=None):
    """Summed cross-entropy of rows ``scores`` (M, V) against ``targets`` (M,),
    divided by ``normalizer``; returns (loss, dscores) with dscores written
    into ``dscores`` when given (it may be ``scores`` itself)."""
    xp = get_array_module(scores)
    M = scores.shape[0]
    if dscores is None:
        dscores = xp.empty_like(scores)
    rows = xp.arange(M)
    shifted = xp.subtract(scores, scores.max(axis=1, keepdims=True), out=dscores)
    target_logit = shifted[rows, targets]
    xp.exp(shifted, out=dscores)
    sums = dscores.sum(axis=1)
    loss = float((xp.log(sums) - target_logit).sum()) / normalizer
    dscores /= sums[:, None]
    dscores[rows, targets] -= 1.0
    dscores /= normalizer
    return loss, dscores


def temporal_softmax_loss(x, y, mask):
    """Masked softmax loss over (N, T, V) scores; sum over tokens / N."""
    xp = get_array_module(x)
    N, T, V = x.shape
    flat_x = x.reshape(N * T, V)
    flat_y = y.reshape(N * T)
    flat_mask = mask.reshape(N * T).astype(x.dtype)
    shifted = flat_x - flat_x.max(axis=1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=1))
    log_probs = shifted - log_z[:, None]
    loss = -(flat_mask * log_probs[xp.arange(N * T), flat_y]).sum() / N
    dx = xp.exp(log_probs)
    dx[xp.arange(N * T), flat_y] -= 1.0
    dx *= flat_mask[:, None] / N
    return float(loss), dx.reshape(N, T, V)
