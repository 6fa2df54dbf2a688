"""GRU, gate blocks r, z, n (PyTorch's nn.GRU with bias_ih = b and bias_hh = 0).

    r = sigmoid(x Wx_r + h Wh_r + b_r)
    z = sigmoid(x Wx_z + h Wh_z + b_z)
    n = tanh(x Wx_n + b_n + r * (h Wh_n))
    h' = (1 - z) * n + z * h

Unlike the RNN and LSTM, the gradient of the input pre-activations (x Wx + b)
and of the recurrent ones (h Wh) differ in the n block (the latter is scaled
by r), so the packed backward keeps two pre-activation gradient buffers, and
dh flows back both through Wh and directly (times z).

CS231n-style signatures: ``gru_step_forward/backward`` (one step, plain, the
reference), ``gru_packed_forward/backward`` (the training fast path, with the
fused kernels ``gru_step_forward``/``gru_step_backward`` when offered) and
``gru_forward/backward`` (full sequences).
"""

from __future__ import annotations

from ...backend import get_array_module
from .. import layers as L
from ..layers import sigmoid
from .base import Cell, single_state_sampler


def gru_step_forward(x, prev_h, Wx, Wh, b):
    """One GRU step. Returns (next_h, cache)."""
    xp = get_array_module(x)
    H = prev_h.shape[1]
    ax = x @ Wx + b
    ah = prev_h @ Wh
    r = sigmoid(ax[:, :H] + ah[:, :H])
    z = sigmoid(ax[:, H : 2 * H] + ah[:, H : 2 * H])
    hn = ah[:, 2 * H :]
    n = xp.tanh(ax[:, 2 * H :] + r * hn)
    next_h = (1.0 - z) * n + z * prev_h
    return next_h, (x, prev_h, Wx, Wh, r, z, n, hn)


def gru_step_backward(dnext_h, cache):
    """Returns (dx, dprev_h, dWx, dWh, db)."""
    xp = get_array_module(dnext_h)
    x, prev_h, Wx, Wh, r, z, n, hn = cache
    dn = dnext_h * (1.0 - z)
    dz = dnext_h * (prev_h - n)
    dan = dn * (1.0 - n * n)  # gradient of n's pre-activation
    dar = dan * hn * r * (1.0 - r)
    daz = dz * z * (1.0 - z)
    dax = xp.concatenate([dar, daz, dan], axis=1)  # of x Wx + b
    dah = xp.concatenate([dar, daz, dan * r], axis=1)  # of h Wh
    dx = dax @ Wx.T
    dprev_h = dah @ Wh.T + dnext_h * z
    dWx = x.T @ dax
    dWh = prev_h.T @ dah
    db = dax.sum(axis=0)
    return dx, dprev_h, dWx, dWh, db


def gru_packed_forward(x_packed, h0, Wx, Wh, b, batch_sizes, ws=None, kernels=None):
    """GRU over a packed batch. Returns (H_packed (total, H), cache).

    The (total, 3H) input pre-activation buffer is overwritten with the
    activated r, z, n; ``HN`` keeps h Wh_n, which the backward pass needs.
    """
    xp = get_array_module(x_packed)
    batch_sizes = [int(n) for n in batch_sizes]
    total, H = x_packed.shape[0], Wh.shape[0]
    L.check_batch_sizes(batch_sizes, total)
    offsets = L.packed_offsets(batch_sizes)
    dtype = x_packed.dtype
    fused = CELL.kernel(kernels, "gru_step_forward")
    gates = L.buffer(ws, "gru_gates", (total, 3 * H), dtype, xp)
    HN = L.buffer(ws, "gru_hn", (total, H), dtype, xp)
    Hp = L.buffer(ws, "gru_h", (total, H), dtype, xp)
    n0 = batch_sizes[0] if batch_sizes else 0
    rec = L.buffer(ws, "gru_rec", (n0, 3 * H), dtype, xp)
    L.input_projection(x_packed, Wx, b, gates, kernels)
    prev_h, gemm = h0, L.gemm_of(kernels)
    # a Gemm that rounds its operands (bf16) gets h's rounding from the step kernel
    h_bits = gemm.twin(Hp, "gru_h") if fused is not None else None
    for t, n in enumerate(batch_sizes):
        s = offsets[t]
        a, r_, hn, h = gates[s : s + n], rec[:n], HN[s : s + n], Hp[s : s + n]
        gemm.matmul(prev_h[:n], Wh, r_)
        if h_bits is not None:
            fused(a, r_, prev_h[:n], hn, h, bits=h_bits[s : s + n])
        elif fused is not None:
            fused(a, r_, prev_h[:n], hn, h)
        else:
            a[:, : 2 * H] += r_[:, : 2 * H]
            sigmoid(a[:, : 2 * H], out=a[:, : 2 * H])
            hn[...] = r_[:, 2 * H :]
            rg, z, ng = a[:, :H], a[:, H : 2 * H], a[:, 2 * H :]
            ng += rg * hn
            xp.tanh(ng, out=ng)
            # h = n + z * (prev_h - n)
            xp.subtract(prev_h[:n], ng, out=h)
            h *= z
            h += ng
        prev_h = h
    cache = (x_packed, h0, Wx, Wh, gates, HN, Hp, batch_sizes, offsets)
    return Hp, cache


def gru_packed_backward(dH_packed, cache, ws=None, kernels=None, out=None, input_grad=True):
    xp = get_array_module(dH_packed)
    x_packed, h0, Wx, Wh, gates, HN, Hp, batch_sizes, offsets = cache
    total, H = Hp.shape
    dtype = Hp.dtype
    fused = CELL.kernel(kernels, "gru_step_backward")
    n0 = batch_sizes[0] if batch_sizes else 0
    dax = L.buffer(ws, "gru_dax", (total, 3 * H), dtype, xp)
    dah = L.buffer(ws, "gru_dah", (total, 3 * H), dtype, xp)
    prev_h = L.prev_h_packed(Hp, h0, batch_sizes, offsets,
                             L.buffer(ws, "gru_prev_h", (total, H), dtype, xp), kernels)
    dh_rec = L.buffer(ws, "gru_dh_rec", (n0, H), dtype, xp)  # (da_h Wh^T) of step t+1
    carry = L.buffer(ws, "gru_carry", (n0, H), dtype, xp)  # dh * z of step t+1 (the direct path)
    dh = L.buffer(ws, "gru_dh", (n0, H), dtype, xp)
    tmp = L.buffer(ws, "gru_tmp", (n0, H), dtype, xp)
    dh0 = L.buffer(ws, "dh0", (h0.shape[0], H), dtype, xp, zero=True)
    scratch = L.recurrent_scratch(ws, n0, H, dtype, xp)
    gemm = L.gemm_of(kernels)
    dax_bits = gemm.twin(dax, "gru_dax") if fused is not None else None
    dah_bits = gemm.twin(dah, "gru_dah") if dax_bits is not None else None
    for t in range(len(batch_sizes) - 1, -1, -1):
        n, s = batch_sizes[t], offsets[t]
        n_next = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
        dx_t, dh_t = dax[s : s + n], dah[s : s + n]
        a, hn, ph = gates[s : s + n], HN[s : s + n], prev_h[s : s + n]
        if dah_bits is not None:
            fused(dx_t, dh_t, dH_packed[s : s + n], dh_rec, carry, n_next, a, hn, ph,
                  bits=(dax_bits[s : s + n], dah_bits[s : s + n]))
        elif fused is not None:
            fused(dx_t, dh_t, dH_packed[s : s + n], dh_rec, carry, n_next, a, hn, ph)
        else:
            r, z, ng = a[:, :H], a[:, H : 2 * H], a[:, 2 * H :]
            d, w = dh[:n], tmp[:n]
            d[...] = dH_packed[s : s + n]
            d[:n_next] += dh_rec[:n_next]
            d[:n_next] += carry[:n_next]
            d_r, d_z, d_n = dx_t[:, :H], dx_t[:, H : 2 * H], dx_t[:, 2 * H :]
            # dan = dh (1 - z) (1 - n^2)
            xp.multiply(ng, ng, out=w)
            xp.subtract(1.0, w, out=w)
            xp.subtract(1.0, z, out=d_n)
            d_n *= w
            d_n *= d
            # dar = dan * hn * r (1 - r)
            xp.subtract(1.0, r, out=w)
            w *= r
            w *= hn
            xp.multiply(d_n, w, out=d_r)
            # daz = dh (h_prev - n) z (1 - z)
            xp.subtract(1.0, z, out=w)
            w *= z
            xp.subtract(ph, ng, out=d_z)
            d_z *= w
            d_z *= d
            dh_t[:, : 2 * H] = dx_t[:, : 2 * H]
            xp.multiply(d_n, r, out=dh_t[:, 2 * H :])
            xp.multiply(d, z, out=carry[:n])
        L.recurrent_backward(dh_t, Wh, (dh_rec if t > 0 else dh0)[:n], scratch=scratch,
                             kernels=kernels)
        if t == 0:
            dh0[:n] += carry[:n]
    return L.weight_grads(x_packed, prev_h, dax, Wx, dh0, out, ws, da_h=dah, input_grad=input_grad,
                          kernels=kernels)


def gru_forward(x, h0, Wx, Wh, b):
    return L.full_sequence_forward(gru_packed_forward, x, h0, Wx, Wh, b)


def gru_backward(dh, cache):
    return L.full_sequence_backward(gru_packed_backward, dh, cache)


CELL = Cell(name="gru", gates=3,
            packed_forward=gru_packed_forward, packed_backward=gru_packed_backward,
            forward=gru_forward, backward=gru_backward,
            sample_step=single_state_sampler(gru_step_forward),
            kernels=("gru_step_forward", "gru_step_backward"))
