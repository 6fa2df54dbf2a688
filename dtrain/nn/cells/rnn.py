"""Vanilla tanh RNN: next_h = tanh(x Wx + prev_h Wh + b).

CS231n signatures: ``rnn_step_forward/backward`` (one step, plain, the
reference), ``rnn_packed_forward/backward`` (the training fast path, with the
fused kernels ``rnn_step_forward``/``rnn_step_backward`` when offered) and
``rnn_forward/backward`` (full sequences).
"""

from __future__ import annotations

from ...backend import get_array_module
from .. import layers as L
from .base import Cell, single_state_sampler


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



def rnn_packed_forward(x_packed, h0, Wx, Wh, b, batch_sizes, ws=None, kernels=None):
    """Tanh RNN over a packed batch. Returns (H_packed (total, H), cache)."""
    xp = get_array_module(x_packed)
    batch_sizes = [int(n) for n in batch_sizes]
    total, H = x_packed.shape[0], Wh.shape[0]
    L.check_batch_sizes(batch_sizes, total)
    offsets = L.packed_offsets(batch_sizes)
    dtype = x_packed.dtype
    fused = CELL.kernel(kernels, "rnn_step_forward")
    Hp = L.buffer(ws, "rnn_h", (total, H), dtype, xp)
    L.input_projection(x_packed, Wx, b, Hp, kernels)  # pre-activations, tanh'd in place
    rec = L.buffer(ws, "rnn_rec", (batch_sizes[0] if batch_sizes else 0, H), dtype, xp)
    prev, gemm = h0, L.gemm_of(kernels)
    # a Gemm that rounds its operands (bf16) gets h's rounding from the step kernel
    h_bits = gemm.twin(Hp, "rnn_h") if fused is not None else None
    for t, n in enumerate(batch_sizes):
        a = Hp[offsets[t] : offsets[t] + n]
        r = rec[:n]
        gemm.matmul(prev[:n], Wh, r)
        if h_bits is not None:
            fused(a, r, bits=h_bits[offsets[t] : offsets[t] + n])
        elif fused is not None:
            fused(a, r)
        else:
            a += r
            xp.tanh(a, out=a)
        prev = a
    cache = (x_packed, h0, Wx, Wh, Hp, batch_sizes, offsets)
    return Hp, cache


def rnn_packed_backward(dH_packed, cache, ws=None, kernels=None, out=None, input_grad=True):
    xp = get_array_module(dH_packed)
    x_packed, h0, Wx, Wh, Hp, batch_sizes, offsets = cache
    total, H = Hp.shape
    dtype = Hp.dtype
    fused = CELL.kernel(kernels, "rnn_step_backward")
    da = L.buffer(ws, "rnn_da", (total, H), dtype, xp)
    n0 = batch_sizes[0] if batch_sizes else 0
    dh_rec = L.buffer(ws, "rnn_dh_rec", (n0, H), dtype, xp)
    dh0 = L.buffer(ws, "dh0", (h0.shape[0], H), dtype, xp, zero=True)
    scratch = L.recurrent_scratch(ws, n0, H, dtype, xp)
    d_bits = L.gemm_of(kernels).twin(da, "rnn_da") if fused is not None else None
    for t in range(len(batch_sizes) - 1, -1, -1):
        n, s = batch_sizes[t], offsets[t]
        n_next = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
        d = da[s : s + n]
        h = Hp[s : s + n]
        if d_bits is not None:
            fused(d, dH_packed[s : s + n], dh_rec, n_next, h, bits=d_bits[s : s + n])
        elif fused is not None:
            fused(d, dH_packed[s : s + n], dh_rec, n_next, h)
        else:
            d[...] = dH_packed[s : s + n]
            d[:n_next] += dh_rec[:n_next]
            tmp = L.buffer(ws, "rnn_tmp", (n, H), dtype, xp)
            xp.multiply(h, h, out=tmp)
            xp.subtract(1.0, tmp, out=tmp)
            d *= tmp
        L.recurrent_backward(d, Wh, (dh_rec if t > 0 else dh0)[:n], scratch=scratch,
                             kernels=kernels)
    prev_h = L.prev_h_packed(Hp, h0, batch_sizes, offsets,
                             L.buffer(ws, "rnn_prev_h", (total, H), dtype, xp), kernels)
    return L.weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws, input_grad=input_grad,
                          kernels=kernels)


def rnn_forward(x, h0, Wx, Wh, b):
    return L.full_sequence_forward(rnn_packed_forward, x, h0, Wx, Wh, b)


def rnn_backward(dh, cache):
    return L.full_sequence_backward(rnn_packed_backward, dh, cache)




CELL = Cell(name="rnn", gates=1,
            packed_forward=rnn_packed_forward, packed_backward=rnn_packed_backward,
            forward=rnn_forward, backward=rnn_backward,
            sample_step=single_state_sampler(rnn_step_forward),
            kernels=("rnn_step_forward", "rnn_step_backward"))
