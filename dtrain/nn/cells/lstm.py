"""LSTM, gate blocks i, f, o, g (c0 = 0).

CS231n signatures: ``lstm_step_forward/backward`` (one step, plain, the
reference), ``lstm_packed_forward/backward`` (the training path: the plain xp
time loop, or, given a kernel set, the kernel set's own recurrence,
``lstm_recurrence_forward/backward``, ``dtrain/kernels/base.py``) and
``lstm_forward/backward`` (full sequences).
"""

from __future__ import annotations

import numpy as np

from ...backend import get_array_module
from .. import layers as L
from ..layers import sigmoid
from .base import Cell


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



def lstm_packed_forward(x_packed, h0, Wx, Wh, b, batch_sizes, ws=None, kernels=None):
    """LSTM over a packed batch (c0 = 0). Returns (H_packed (total, H), cache).

    The (total, 4H) pre-activation buffer is overwritten with the activated
    gates i, f, o, g, which is all the backward pass needs besides c and tanh(c).
    Two paths: the plain xp loop below (``kernels`` None), or the kernel set's own
    recurrence (``kernels.lstm_recurrence_forward``, which adds b in its step pass).
    """
    xp = get_array_module(x_packed)
    batch_sizes = [int(n) for n in batch_sizes]
    total, H = x_packed.shape[0], Wh.shape[0]
    L.check_batch_sizes(batch_sizes, total)
    offsets = L.packed_offsets(batch_sizes)
    dtype = x_packed.dtype
    gates = L.buffer(ws, "lstm_gates", (total, 4 * H), dtype, xp)
    C = L.buffer(ws, "lstm_c", (total, H), dtype, xp)
    TC = L.buffer(ws, "lstm_tanh_c", (total, H), dtype, xp)
    Hp = L.buffer(ws, "lstm_h", (total, H), dtype, xp)
    if kernels is None:
        L.input_projection(x_packed, Wx, b, gates, kernels)
        _reference_forward(gates, C, TC, Hp, h0, Wh, batch_sizes, offsets, ws)
        PH = None
    else:
        L.input_projection(x_packed, Wx, None, gates, kernels)
        PH = kernels.lstm_recurrence_forward(gates, C, TC, Hp, h0, Wh, b, batch_sizes, offsets, ws)
    cache = (x_packed, h0, Wx, Wh, gates, C, TC, Hp, batch_sizes, offsets, PH)
    return Hp, cache


def _reference_forward(gates, C, TC, Hp, h0, Wh, batch_sizes, offsets, ws):
    """The plain xp time loop: ``gates`` holds x Wx + b, and receives the activated gates."""
    xp = get_array_module(gates)
    H, dtype = Hp.shape[1], Hp.dtype
    n0 = batch_sizes[0] if batch_sizes else 0
    rec = L.buffer(ws, "lstm_rec", (n0, 4 * H), dtype, xp)
    tmp = L.buffer(ws, "lstm_tmp", (n0, H), dtype, xp)
    prev_h, prev_c, gemm = h0, L.zeros_buffer(ws, "lstm_c0", (n0, H), dtype, xp), L.gemm_of(None)
    for t, n in enumerate(batch_sizes):
        s = offsets[t]
        a = gates[s : s + n]
        c, tc, h = C[s : s + n], TC[s : s + n], Hp[s : s + n]
        r = rec[:n]
        gemm.matmul(prev_h[:n], Wh, r)
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


def lstm_packed_backward(dH_packed, cache, ws=None, kernels=None, out=None, input_grad=True):
    xp = get_array_module(dH_packed)
    x_packed, h0, Wx, Wh, gates, C, TC, Hp, batch_sizes, offsets, prev_h = cache
    total, H = Hp.shape
    dtype = Hp.dtype
    n0 = batch_sizes[0] if batch_sizes else 0
    # On the host, no zeroing pass: dh0's first n0 rows are written by step 0.
    host = xp is np
    dh0 = L.buffer(ws, "dh0", (h0.shape[0], H), dtype, xp, zero=not host)
    if host:
        dh0[n0:] = 0
    if kernels is None:
        da = _reference_backward(dH_packed, gates, C, TC, Wh, dh0, batch_sizes, offsets, ws)
    else:
        da = kernels.lstm_recurrence_backward(dH_packed, gates, C, TC, h0, Wh, dh0, batch_sizes,
                                              offsets, ws)
    if prev_h is None:  # not written by the forward steps
        prev_h = L.prev_h_packed(Hp, h0, batch_sizes, offsets,
                                 L.buffer(ws, "lstm_prev_h", (total, H), dtype, xp), kernels)
    return L.weight_grads(x_packed, prev_h, da, Wx, dh0, out, ws, input_grad=input_grad,
                          kernels=kernels)


def _reference_backward(dH_packed, gates, C, TC, Wh, dh0, batch_sizes, offsets, ws):
    """The plain xp backward time loop: returns the gradient of every step's pre-activations."""
    xp = get_array_module(dH_packed)
    total, H = TC.shape
    dtype = TC.dtype
    n0 = batch_sizes[0] if batch_sizes else 0
    da = L.buffer(ws, "lstm_da", (total, 4 * H), dtype, xp)
    dh_rec = L.buffer(ws, "lstm_dh_rec", (n0, H), dtype, xp)
    dc_rec = L.buffer(ws, "lstm_dc_rec", (n0, H), dtype, xp, zero=xp is not np)
    zero_c = L.zeros_buffer(ws, "lstm_c0", (n0, H), dtype, xp)
    dh = L.buffer(ws, "lstm_dh", (n0, H), dtype, xp)
    dc = L.buffer(ws, "lstm_dc", (n0, H), dtype, xp)
    tmp = L.buffer(ws, "lstm_tmp", (n0, H), dtype, xp)
    scratch = L.recurrent_scratch(ws, n0, H, dtype, xp)
    for t in range(len(batch_sizes) - 1, -1, -1):
        n, s = batch_sizes[t], offsets[t]
        n_next = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
        prev_c = C[offsets[t - 1] : offsets[t - 1] + n] if t > 0 else zero_c[:n]
        a, d, tc = gates[s : s + n], da[s : s + n], TC[s : s + n]
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
        L.recurrent_backward(d, Wh, (dh_rec if t > 0 else dh0)[:n], scratch=scratch)
    return da


def lstm_forward(x, h0, Wx, Wh, b):
    return L.full_sequence_forward(lstm_packed_forward, x, h0, Wx, Wh, b)


def lstm_backward(dh, cache):
    return L.full_sequence_backward(lstm_packed_backward, dh, cache)




def _sample_step(x, state, Wx, Wh, b):
    h, c = state
    h, c, _ = lstm_step_forward(x, h, c, Wx, Wh, b)
    return h, (h, c)


def _init_state(h0):
    xp = get_array_module(h0)
    return (h0, xp.zeros_like(h0))


CELL = Cell(name="lstm", gates=4,
            packed_forward=lstm_packed_forward, packed_backward=lstm_packed_backward,
            forward=lstm_forward, backward=lstm_backward, sample_step=_sample_step,
            init_state=_init_state, kernels=("lstm_step_forward", "lstm_step_backward"))
