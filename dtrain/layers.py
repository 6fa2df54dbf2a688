"""Layers of the captioning network: pure forward/backward pairs.

Signatures follow CS231n assignment 3 (see DESIGN.md, "Numerical contract").
Every function is written once against the array module ``xp`` of its inputs,
so it runs unchanged on NumPy and CuPy.

Two levels:

* step functions (``rnn_step_forward`` ...): one time step, the mathematics
  written plainly; they are the reference the fast path is tested against.
* sequence functions (``rnn_forward`` ...): the fast path. They run on a
  *packed* time-major layout (like a packed sequence): at step t only the first
  ``batch_sizes[t]`` rows of a length-sorted batch are still inside a caption,
  so the input projection of every (row, t) that matters is one GEMM, each
  step does one ``h @ Wh`` GEMM plus the gate nonlinearities into preallocated
  buffers, and the backward pass fills one pre-activation gradient buffer from
  which dWx, dWh and dx each come from one GEMM. The CS231n signatures are thin
  wrappers with every row active for all T steps.

Buffers may come from a :class:`Workspace`, so a training step that calls the
packed functions with the same shapes allocates nothing after the first call.
"""

from __future__ import annotations

import numpy as np

from .backend import get_array_module


class Workspace:
    """Named scratch buffers that are reused across calls (grown on demand)."""

    def __init__(self):
        self._buffers = {}

    def get(self, name, shape, dtype, xp=np, zero=False):
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        dtype = np.dtype(dtype)
        key = (name, dtype.str, xp.__name__)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = xp.empty(max(size, 1), dtype=dtype)
            self._buffers[key] = buf
        out = buf[:size].reshape(shape)
        if zero:
            out.fill(0)
        return out

    def nbytes(self):
        return sum(b.nbytes for b in self._buffers.values())


def _buffer(ws, name, shape, dtype, xp, zero=False):
    if ws is None:
        return xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
    return ws.get(name, shape, dtype, xp, zero=zero)


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
# Vanilla RNN


def rnn_step_forward(x, prev_h, Wx, Wh, b):
    """One tanh RNN step: next_h = tanh(x Wx + prev_h Wh + b)."""
    xp = get_array_module(x)
    next_h = xp.tanh(x @ Wx + prev_h @ Wh + b)
    return next_h, (x, prev_h, Wx, Wh, next_h)


def rnn_step_backward(dnext_h, cache):
    x, prev_h, Wx, Wh, next_h = cache
    da = dnext_h * (1.0 - next_h * next_h)
    dx = da @ Wx.T
    dprev_h = da @ Wh.T
    dWx = x.T @ da
    dWh = prev_h.T @ da
    db = da.sum(axis=0)
    return dx, dprev_h, dWx, dWh, db


# ---------------------------------------------------------------------------
# LSTM (gate blocks i, f, o, g)


def lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b):
    xp = get_array_module(x)
    H = prev_h.shape[1]
    a = x @ Wx + prev_h @ Wh + b
    i = sigmoid(a[:, :H])
    f = sigmoid(a[:, H : 2 * H])
    o = sigmoid(a[:, 2 * H : 3 * H])
    g = xp.tanh(a[:, 3 * H :])
    next_c = f * prev_c + i * g
    tanh_c = xp.tanh(next_c)
    next_h = o * tanh_c
    return next_h, next_c, (x, prev_h, prev_c, Wx, Wh, i, f, o, g, tanh_c)


def lstm_step_backward(dnext_h, dnext_c, cache):
    xp = get_array_module(dnext_h)
    x, prev_h, prev_c, Wx, Wh, i, f, o, g, tanh_c = cache
    # dL/dc_t has two paths: the carried dnext_c and the one through h = o*tanh(c).
    dc = dnext_c + dnext_h * o * (1.0 - tanh_c * tanh_c)
    da_i = dc * g * i * (1.0 - i)
    da_f = dc * prev_c * f * (1.0 - f)
    da_o = dnext_h * tanh_c * o * (1.0 - o)
    da_g = dc * i * (1.0 - g * g)  # gradient w.r.t. the pre-activation of g
    da = xp.concatenate([da_i, da_f, da_o, da_g], axis=1)
    dx = da @ Wx.T
    dprev_h = da @ Wh.T
    dprev_c = dc * f
    dWx = x.T @ da
    dWh = prev_h.T @ da
    db = da.sum(axis=0)
    return dx, dprev_h, dprev_c, dWx, dWh, db


# ---------------------------------------------------------------------------
# Packed sequence core (the fast path)


def packed_offsets(batch_sizes):
    """Start offset of each time step's block in the packed layout."""
    offsets = [0]
    for n in batch_sizes:
        offsets.append(offsets[-1] + int(n))
    return offsets


def _check_batch_sizes(batch_sizes, total):
    for t in range(1, len(batch_sizes)):
        if batch_sizes[t] > batch_sizes[t - 1]:
            raise ValueError("batch_sizes must be non-increasing (rows sorted by length)")
    if sum(batch_sizes) != total:
        raise ValueError(f"packed input has {total} rows, batch_sizes sum to {sum(batch_sizes)}")


def _input_projection(x_packed, Wx, b, out):
    """out = x_packed @ Wx + b: the input projection of every step, one GEMM."""
    xp = get_array_module(x_packed)
    xp.matmul(x_packed, Wx, out=out)
    out += b
    return out


def _prev_h_packed(H_packed, h0, batch_sizes, offsets, out):
    """Rows h_{t-1}[:n_t] of every step, stacked in packed order.

    dWh is then one GEMM, prev_h_packed.T @ da_packed, after the loop.
    """
    n0 = batch_sizes[0]
    out[:n0] = h0[:n0]
    for t in range(1, len(batch_sizes)):
        n = batch_sizes[t]
        out[offsets[t] : offsets[t] + n] = H_packed[offsets[t - 1] : offsets[t - 1] + n]
    return out


def _weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws):
    """dWx, dWh, db and dx from the packed pre-activation gradients: one GEMM each.

    ``out`` = (dWx, dWh, db) arrays to write into (views of a flat gradient
    buffer), or None to allocate.
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
    xp.matmul(prev_h.T, da, out=dWh)
    da.sum(axis=0, out=db)
    dx_packed = _buffer(ws, "dx_packed", (da.shape[0], Wx.shape[0]), da.dtype, xp)
    xp.matmul(da, Wx.T, out=dx_packed)
    return dx_packed, dh0, dWx, dWh, db


def rnn_packed_forward(x_packed, h0, Wx, Wh, b, batch_sizes, ws=None, kernels=None):
    """Tanh RNN over a packed batch. Returns (H_packed (total, H), cache)."""
    xp = get_array_module(x_packed)
    batch_sizes = [int(n) for n in batch_sizes]
    total, H = x_packed.shape[0], Wh.shape[0]
    _check_batch_sizes(batch_sizes, total)
    offsets = packed_offsets(batch_sizes)
    dtype = x_packed.dtype
    Hp = _buffer(ws, "rnn_h", (total, H), dtype, xp)
    _input_projection(x_packed, Wx, b, Hp)  # pre-activations, tanh'd in place
    rec = _buffer(ws, "rnn_rec", (batch_sizes[0] if batch_sizes else 0, H), dtype, xp)
    prev = h0
    for t, n in enumerate(batch_sizes):
        a = Hp[offsets[t] : offsets[t] + n]
        r = rec[:n]
        xp.matmul(prev[:n], Wh, out=r)
        if kernels is not None:
            kernels.rnn_step_forward(a, r)
        else:
            a += r
            xp.tanh(a, out=a)
        prev = a
    cache = (x_packed, h0, Wx, Wh, Hp, batch_sizes, offsets)
    return Hp, cache


def rnn_packed_backward(dH_packed, cache, ws=None, kernels=None, out=None):
    xp = get_array_module(dH_packed)
    x_packed, h0, Wx, Wh, Hp, batch_sizes, offsets = cache
    total, H = Hp.shape
    dtype = Hp.dtype
    da = _buffer(ws, "rnn_da", (total, H), dtype, xp)
    n0 = batch_sizes[0] if batch_sizes else 0
    dh_rec = _buffer(ws, "rnn_dh_rec", (n0, H), dtype, xp)
    dh0 = _buffer(ws, "dh0", (h0.shape[0], H), dtype, xp, zero=True)
    for t in range(len(batch_sizes) - 1, -1, -1):
        n, s = batch_sizes[t], offsets[t]
        n_next = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
        d = da[s : s + n]
        h = Hp[s : s + n]
        if kernels is not None:
            kernels.rnn_step_backward(d, dH_packed[s : s + n], dh_rec, n_next, h)
        else:
            d[...] = dH_packed[s : s + n]
            d[:n_next] += dh_rec[:n_next]
            tmp = _buffer(ws, "rnn_tmp", (n, H), dtype, xp)
            xp.multiply(h, h, out=tmp)
            xp.subtract(1.0, tmp, out=tmp)
            d *= tmp
        if t > 0:
            xp.matmul(d, Wh.T, out=dh_rec[:n])
        else:
            xp.matmul(d, Wh.T, out=dh0[:n])
    prev_h = _prev_h_packed(Hp, h0, batch_sizes, offsets, _buffer(ws, "rnn_prev_h", (total, H), dtype, xp))
    return _weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws)


def lstm_packed_forward(x_packed, h0, Wx, Wh, b, batch_sizes, ws=None, kernels=None):
    """LSTM over a packed batch (c0 = 0). Returns (H_packed (total, H), cache).

    The (total, 4H) pre-activation buffer is overwritten with the activated
    gates i, f, o, g, which is all the backward pass needs besides c and tanh(c).
    """
    xp = get_array_module(x_packed)
    batch_sizes = [int(n) for n in batch_sizes]
    total, H = x_packed.shape[0], Wh.shape[0]
    _check_batch_sizes(batch_sizes, total)
    offsets = packed_offsets(batch_sizes)
    dtype = x_packed.dtype
    gates = _buffer(ws, "lstm_gates", (total, 4 * H), dtype, xp)
    C = _buffer(ws, "lstm_c", (total, H), dtype, xp)
    TC = _buffer(ws, "lstm_tanh_c", (total, H), dtype, xp)
    Hp = _buffer(ws, "lstm_h", (total, H), dtype, xp)
    n0 = batch_sizes[0] if batch_sizes else 0
    rec = _buffer(ws, "lstm_rec", (n0, 4 * H), dtype, xp)
    zero_c = _buffer(ws, "lstm_c0", (n0, H), dtype, xp, zero=True)
    tmp = _buffer(ws, "lstm_tmp", (n0, H), dtype, xp)
    _input_projection(x_packed, Wx, b, gates)
    prev_h, prev_c = h0, zero_c
    for t, n in enumerate(batch_sizes):
        s = offsets[t]
        a = gates[s : s + n]
        r = rec[:n]
        xp.matmul(prev_h[:n], Wh, out=r)
        c, tc, h = C[s : s + n], TC[s : s + n], Hp[s : s + n]
        if kernels is not None:
            kernels.lstm_step_forward(a, r, prev_c, c, tc, h)
        else:
            a += r
            sigmoid(a[:, : 3 * H], out=a[:, : 3 * H])
            xp.tanh(a[:, 3 * H :], out=a[:, 3 * H :])
            i, f, o, g = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
            xp.multiply(f, prev_c[:n], out=c)
            xp.multiply(i, g, out=tmp[:n])
            c += tmp[:n]
            xp.tanh(c, out=tc)
            xp.multiply(o, tc, out=h)
        prev_h, prev_c = h, c
    cache = (x_packed, h0, Wx, Wh, gates, C, TC, Hp, batch_sizes, offsets)
    return Hp, cache


def lstm_packed_backward(dH_packed, cache, ws=None, kernels=None, out=None):
    xp = get_array_module(dH_packed)
    x_packed, h0, Wx, Wh, gates, C, TC, Hp, batch_sizes, offsets = cache
    total, H = Hp.shape
    dtype = Hp.dtype
    n0 = batch_sizes[0] if batch_sizes else 0
    da = _buffer(ws, "lstm_da", (total, 4 * H), dtype, xp)
    dh_rec = _buffer(ws, "lstm_dh_rec", (n0, H), dtype, xp)
    dc_rec = _buffer(ws, "lstm_dc_rec", (n0, H), dtype, xp, zero=True)
    zero_c = _buffer(ws, "lstm_c0", (n0, H), dtype, xp, zero=True)
    dh = _buffer(ws, "lstm_dh", (n0, H), dtype, xp)
    dc = _buffer(ws, "lstm_dc", (n0, H), dtype, xp)
    tmp = _buffer(ws, "lstm_tmp", (n0, H), dtype, xp)
    dh0 = _buffer(ws, "dh0", (h0.shape[0], H), dtype, xp, zero=True)
    for t in range(len(batch_sizes) - 1, -1, -1):
        n, s = batch_sizes[t], offsets[t]
        n_next = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
        prev_c = C[offsets[t - 1] : offsets[t - 1] + n] if t > 0 else zero_c[:n]
        d = da[s : s + n]
        a = gates[s : s + n]
        tc = TC[s : s + n]
        if kernels is not None:
            kernels.lstm_step_backward(d, dH_packed[s : s + n], dh_rec, dc_rec, n_next, a, prev_c, tc)
        else:
            i, f, o, g = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
            dh_t, dc_t, w = dh[:n], dc[:n], tmp[:n]
            dh_t[...] = dH_packed[s : s + n]
            dh_t[:n_next] += dh_rec[:n_next]
            # dc = dc_carried + dh * o * (1 - tanh(c)^2)
            xp.multiply(tc, tc, out=w)
            xp.subtract(1.0, w, out=w)
            w *= o
            xp.multiply(dh_t, w, out=dc_t)
            dc_t[:n_next] += dc_rec[:n_next]
            d_i, d_f, d_o, d_g = d[:, :H], d[:, H : 2 * H], d[:, 2 * H : 3 * H], d[:, 3 * H :]
            # sigmoid'(a) = s (1 - s), tanh'(a) = 1 - t^2, all from the stored activations
            xp.subtract(1.0, i, out=w)
            w *= i
            w *= g
            xp.multiply(dc_t, w, out=d_i)
            xp.subtract(1.0, f, out=w)
            w *= f
            w *= prev_c
            xp.multiply(dc_t, w, out=d_f)
            xp.subtract(1.0, o, out=w)
            w *= o
            w *= tc
            xp.multiply(dh_t, w, out=d_o)
            xp.multiply(g, g, out=w)
            xp.subtract(1.0, w, out=w)
            w *= i
            xp.multiply(dc_t, w, out=d_g)
            xp.multiply(dc_t, f, out=dc_rec[:n])
        if t > 0:
            xp.matmul(d, Wh.T, out=dh_rec[:n])
        else:
            xp.matmul(d, Wh.T, out=dh0[:n])
    prev_h = _prev_h_packed(Hp, h0, batch_sizes, offsets, _buffer(ws, "lstm_prev_h", (total, H), dtype, xp))
    return _weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws)


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


def _full_sequence_forward(packed_forward, x, h0, Wx, Wh, b):
    N, T, _ = x.shape
    Hp, core = packed_forward(_to_packed(x), h0, Wx, Wh, b, [N] * T)
    return _from_packed(Hp, N, T), (core, N, T)


def _full_sequence_backward(packed_backward, dh, cache):
    core, N, T = cache
    dx_p, dh0, dWx, dWh, db = packed_backward(_to_packed(dh), core)
    return _from_packed(dx_p, N, T), dh0, dWx, dWh, db


def rnn_forward(x, h0, Wx, Wh, b):
    return _full_sequence_forward(rnn_packed_forward, x, h0, Wx, Wh, b)


def rnn_backward(dh, cache):
    return _full_sequence_backward(rnn_packed_backward, dh, cache)


def lstm_forward(x, h0, Wx, Wh, b):
    return _full_sequence_forward(lstm_packed_forward, x, h0, Wx, Wh, b)


def lstm_backward(dh, cache):
    return _full_sequence_backward(lstm_packed_backward, dh, cache)


# ---------------------------------------------------------------------------
# Word embedding


def word_embedding_forward(x, W):
    """out[n, t] = W[x[n, t]] for integer word ids x of any shape."""
    xp = get_array_module(W)
    out = xp.take(W, x, axis=0)
    return out, (x, W.shape)


def embedding_grad_sparse(words, dout):
    """Row-sparse embedding gradient: (unique word ids, summed rows).

    ``words`` (M,) ids, ``dout`` (M, W) the gradients of their embeddings.
    Sorting the ids groups equal words, so each row sum is one segment
    reduction (no np.add.at, which is slow on the CPU).
    """
    xp = get_array_module(dout)
    words = words.reshape(-1)
    dout = dout.reshape(words.shape[0], -1)
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
