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

import numpy as np

from ..backend import get_array_module
from ..kernels.gemm import (  # noqa: F401  (the recurrent GEMM helpers every cell uses)
    TRANSPOSED_BACKWARD_ROWS,
    gemm_of,
    recurrent_backward,
    recurrent_backward_T,
    recurrent_scratch,
)
from .workspace import Workspace, buffer, zeros_buffer  # noqa: F401

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


def input_projection(x_packed, Wx, b, out, kernels=None):
    """out = x_packed @ Wx + b: the input projection of every step, one GEMM
    (b None: left to the caller)."""
    gemm_of(kernels).matmul(x_packed, Wx, out)
    if b is not None:
        out += b
    return out


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


def weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws, da_h=None, input_grad=True, kernels=None):
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
    gemm = gemm_of(kernels)
    with gemm.operands_fixed(da):  # read by two or three GEMMs (rounded once in bf16)
        gemm.matmul(x_packed.T, da, dWx)
        gemm.matmul(prev_h.T, da if da_h is None else da_h, dWh)
        if not input_grad:
            return da, dh0, dWx, dWh, db
        da.sum(axis=0, out=db)
        dx_packed = buffer(ws, "dx_packed", (da.shape[0], Wx.shape[0]), da.dtype, xp)
        gemm.matmul(da, Wx.T, dx_packed)
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
        new_id = (sorted_words[1:] != sorted_words[:-1]).astype(np.int64)
        slot = xp.cumsum(xp.concatenate([xp.zeros(1, dtype=np.int64), new_id]))
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
