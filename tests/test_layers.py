"""Finite-difference checks of every backward function, and step-vs-sequence agreement."""

import warnings

import numpy as np
import pytest

from dtrain.nn import layers
from dtrain.nn.cells import CELLS, gru, lstm, rnn
from helpers import numeric_grad, rel_error

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape)


def test_rnn_step_backward():
    N, D, H = 4, 5, 6
    x, h, Wx, Wh, b = randn(N, D), randn(N, H), randn(D, H), randn(H, H), randn(H)
    out, cache = rnn.rnn_step_forward(x, h, Wx, Wh, b)
    dout = randn(*out.shape)
    grads = rnn.rnn_step_backward(dout, cache)
    for arr, g in zip((x, h, Wx, Wh, b), grads):
        num = numeric_grad(lambda: rnn.rnn_step_forward(x, h, Wx, Wh, b)[0], arr, dout)
        assert rel_error(num, g) < 1e-7


def test_lstm_step_backward():
    N, D, H = 4, 5, 6
    x, h, c = randn(N, D), randn(N, H), randn(N, H)
    Wx, Wh, b = randn(D, 4 * H), randn(H, 4 * H), randn(4 * H)
    nh, nc, cache = lstm.lstm_step_forward(x, h, c, Wx, Wh, b)
    dnh, dnc = randn(*nh.shape), randn(*nc.shape)
    grads = lstm.lstm_step_backward(dnh, dnc, cache)

    def f_both():
        a, b_, _ = lstm.lstm_step_forward(x, h, c, Wx, Wh, b)
        return np.concatenate([a, b_])

    dboth = np.concatenate([dnh, dnc])
    for arr, g in zip((x, h, c, Wx, Wh, b), grads):
        num = numeric_grad(f_both, arr, dboth)
        assert rel_error(num, g) < 1e-7


def test_gru_step_backward():
    N, D, H = 4, 5, 6
    x, h = randn(N, D), randn(N, H)
    Wx, Wh, b = randn(D, 3 * H) / np.sqrt(D), randn(H, 3 * H) / np.sqrt(H), randn(3 * H)
    out, cache = gru.gru_step_forward(x, h, Wx, Wh, b)
    dout = randn(*out.shape)
    grads = gru.gru_step_backward(dout, cache)
    for arr, g in zip((x, h, Wx, Wh, b), grads):
        num = numeric_grad(lambda: gru.gru_step_forward(x, h, Wx, Wh, b)[0], arr, dout)
        assert rel_error(num, g) < 1e-7


def _weights(cell, D, H, scale=True):
    G = CELLS[cell].gates * H
    if scale:  # realistic scale (1/sqrt(fan-in)) keeps the gates away from saturation
        return randn(D, G) / np.sqrt(D), randn(H, G) / np.sqrt(H), 0.1 * randn(G)
    return randn(D, G), randn(H, G), randn(G)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_sequence_backward(cell):
    N, T, D, H = 3, 5, 4, 6
    x, h0 = randn(N, T, D), randn(N, H)
    Wx, Wh, b = _weights(cell, D, H)
    fwd, bwd = CELLS[cell].forward, CELLS[cell].backward
    out, cache = fwd(x, h0, Wx, Wh, b)
    dout = randn(*out.shape)
    grads = bwd(dout, cache)
    for arr, g in zip((x, h0, Wx, Wh, b), grads):
        num = numeric_grad(lambda: fwd(x, h0, Wx, Wh, b)[0], arr, dout)
        assert rel_error(num, g) < 1e-7


def _step_loop(cell, x, h0, Wx, Wh, b, dout):
    """Forward and backward by a loop over the plain CS231n step functions."""
    N, T, _ = x.shape
    h, c = h0, np.zeros_like(h0)
    caches, hs = [], []
    for t in range(T):
        if cell == "lstm":
            h, c, cc = lstm.lstm_step_forward(x[:, t], h, c, Wx, Wh, b)
        else:
            step = {"rnn": rnn.rnn_step_forward, "gru": gru.gru_step_forward}[cell]
            h, cc = step(x[:, t], h, Wx, Wh, b)
        caches.append(cc)
        hs.append(h)
    dx = np.zeros_like(x)
    dWx, dWh, db = np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)
    dh_next, dc_next = np.zeros_like(h0), np.zeros_like(h0)
    for t in reversed(range(T)):
        if cell == "lstm":
            dx[:, t], dh_next, dc_next, a, bb, cb = lstm.lstm_step_backward(
                dout[:, t] + dh_next, dc_next, caches[t])
        else:
            step_bwd = {"rnn": rnn.rnn_step_backward, "gru": gru.gru_step_backward}[cell]
            dx[:, t], dh_next, a, bb, cb = step_bwd(dout[:, t] + dh_next, caches[t])
        dWx += a
        dWh += bb
        db += cb
    return np.stack(hs, axis=1), (dx, dh_next, dWx, dWh, db)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_sequence_matches_steps(cell):
    """The packed fast path equals a loop over the plain step functions."""
    N, T, D, H = 5, 7, 6, 8
    x, h0, dout = randn(N, T, D), randn(N, H), randn(N, T, H)
    Wx, Wh, b = _weights(cell, D, H, scale=False)
    h_seq, cache = CELLS[cell].forward(x, h0, Wx, Wh, b)
    seq_grads = CELLS[cell].backward(dout, cache)
    h_steps, step_grads = _step_loop(cell, x, h0, Wx, Wh, b, dout)
    np.testing.assert_allclose(h_seq, h_steps, rtol=1e-13, atol=1e-14)
    for got, want in zip(seq_grads, step_grads):
        assert rel_error(got, want) < 1e-12


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_packed_variable_lengths(cell):
    """Packed rows that stop early equal per-row full-length runs truncated."""
    H, D = 5, 4
    lengths = [6, 4, 4, 1]
    N, T = len(lengths), max(lengths)
    x, h0 = randn(N, T, D), randn(N, H)
    Wx, Wh, b = _weights(cell, D, H, scale=False)
    batch_sizes = [sum(L > t for L in lengths) for t in range(T)]
    rows = [(t, n) for t in range(T) for n in range(N) if lengths[n] > t]
    xp_ = np.stack([x[n, t] for t, n in rows])
    dH = randn(len(rows), H)
    c = CELLS[cell]
    Hp, cache = c.packed_forward(xp_, h0, Wx, Wh, b, batch_sizes)
    Hp = Hp.copy()
    dx_p, dh0, dWx, dWh, db = [a.copy() for a in c.packed_backward(dH, cache)]
    # reference: full sequences with zero upstream gradient beyond each row's length
    h_full, fc = c.forward(x, h0, Wx, Wh, b)
    dfull = np.zeros((N, T, H))
    for k, (t, n) in enumerate(rows):
        dfull[n, t] = dH[k]
        np.testing.assert_allclose(Hp[k], h_full[n, t], rtol=1e-12, atol=1e-14)
    rdx, rdh0, rdWx, rdWh, rdb = c.backward(dfull, fc)
    for got, want in ((dh0, rdh0), (dWx, rdWx), (dWh, rdWh), (db, rdb)):
        assert rel_error(got, want) < 1e-12
    for k, (t, n) in enumerate(rows):
        np.testing.assert_allclose(dx_p[k], rdx[n, t], rtol=1e-11, atol=1e-13)


def test_word_embedding_backward_dense_and_sparse():
    N, T, V, D = 3, 6, 7, 4
    x = RNG.integers(0, V, size=(N, T))
    W = randn(V, D)
    out, cache = layers.word_embedding_forward(x, W)
    dout = randn(*out.shape)
    dW = layers.word_embedding_backward(dout, cache)
    num = numeric_grad(lambda: layers.word_embedding_forward(x, W)[0], W, dout)
    assert rel_error(num, dW) < 1e-9
    ids, rows = layers.word_embedding_backward(dout, cache, sparse=True)
    assert np.all(np.diff(ids) > 0)
    assert set(ids.tolist()) == set(x.ravel().tolist())
    np.testing.assert_allclose(rows, dW[ids], rtol=1e-14)


def test_temporal_affine_backward():
    N, T, D, M = 2, 3, 4, 5
    x, w, b = randn(N, T, D), randn(D, M), randn(M)
    out, cache = layers.temporal_affine_forward(x, w, b)
    dout = randn(*out.shape)
    grads = layers.temporal_affine_backward(dout, cache)
    for arr, g in zip((x, w, b), grads):
        num = numeric_grad(lambda: layers.temporal_affine_forward(x, w, b)[0], arr, dout)
        assert rel_error(num, g) < 1e-8


def test_temporal_softmax_loss():
    N, T, V = 5, 4, 6
    x = randn(N, T, V)
    y = RNG.integers(0, V, size=(N, T))
    mask = RNG.random((N, T)) > 0.3
    loss, dx = layers.temporal_softmax_loss(x, y, mask)
    num = numeric_grad(lambda: layers.temporal_softmax_loss(x, y, mask)[0], x)
    assert rel_error(num, dx) < 1e-7
    # the packed form agrees
    sel = mask.reshape(-1)
    loss2, d2 = layers.softmax_cross_entropy(x.reshape(-1, V)[sel].copy(), y.reshape(-1)[sel], N)
    assert abs(loss - loss2) < 1e-12
    np.testing.assert_allclose(d2, dx.reshape(-1, V)[sel], rtol=1e-12, atol=1e-15)


def test_temporal_softmax_loss_sanity():
    """CS231n's sanity values: loss ~ 2.3, 23, 2.2 for 10 classes."""
    def check(N, T, V, p):
        x = 0.001 * np.random.default_rng(0).standard_normal((N, T, V))
        y = np.random.default_rng(1).integers(V, size=(N, T))
        mask = np.random.default_rng(2).random((N, T)) <= p
        return layers.temporal_softmax_loss(x, y, mask)[0]
    assert abs(check(100, 1, 10, 1.0) - 2.3) < 0.01
    assert abs(check(100, 10, 10, 1.0) - 23.0) < 0.1
    assert abs(check(5000, 10, 10, 0.1) - 2.3) < 0.1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_nonlinearities(dtype):
    x = np.array([-1e4, -100, -20, 0, 20, 100, 1e4], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = layers.sigmoid(x)
        p = layers.softmax_rows(np.stack([x, -x]))
        loss, d = layers.softmax_cross_entropy(np.stack([x, -x]), np.array([0, 3]), 2)
    assert np.all(np.isfinite(s)) and np.all(np.isfinite(p)) and np.isfinite(loss)
    assert np.all(np.isfinite(d))
    assert s[0] == 0 and s[-1] == 1 and abs(s[3] - 0.5) < 1e-7
    np.testing.assert_allclose(layers.sigmoid(np.linspace(-8, 8, 17)),
                               1 / (1 + np.exp(-np.linspace(-8, 8, 17))), rtol=1e-13)
    # LSTM step at huge pre-activations stays finite
    H = 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h, c, _ = lstm.lstm_step_forward(np.full((2, 1), 1e4, dtype), np.zeros((2, H), dtype),
                                           np.zeros((2, H), dtype), np.full((1, 4 * H), 1.0, dtype),
                                           np.zeros((H, 4 * H), dtype), np.zeros(4 * H, dtype))
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(c))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recurrent_backward_is_the_plain_product(dtype):
    # (Wh @ d.T).T through a scratch buffer: the same products in the same order as d @ Wh.T
    rng = np.random.default_rng(3)
    Wh = rng.standard_normal((64, 256)).astype(dtype)
    ws = layers.Workspace()
    for n in (1, 5, 32, 17, 128, 129, 200):
        d = rng.standard_normal((n, 256)).astype(dtype)
        out = np.empty((n, 64), dtype=dtype)
        assert layers.recurrent_backward(d, Wh, out, ws) is out
        np.testing.assert_allclose(out, d @ Wh.T, rtol=1e-5 if dtype == np.float32 else 1e-13,
                                   atol=1e-5)
        # the scratch a packed backward pass takes once, before its time loop: the same bits
        again = np.empty_like(out)
        scratch = layers.recurrent_scratch(ws, 200, 64, dtype, np)
        layers.recurrent_backward(d, Wh, again, scratch=scratch)
        assert np.array_equal(again, out)


@pytest.mark.parametrize("shape,dtype", [((7,), np.float32), ((3, 1004), np.float32),
                                         ((513, 2048), np.float64), ((0,), np.int64),
                                         ((2, 3, 5), np.int32)])
def test_host_buffers_start_on_a_cache_line(shape, dtype):
    from dtrain import alloc

    for make in (alloc.empty, alloc.zeros):
        out = make(shape, dtype)
        assert out.shape == shape and out.dtype == dtype and out.flags.c_contiguous
        assert out.size == 0 or out.ctypes.data % alloc.HOST_ALIGNMENT == 0
    assert not alloc.zeros(shape, dtype).any()


def test_the_step_buffers_start_on_a_cache_line():
    # the flat parameter, gradient and Adam buffers and every workspace buffer of a step
    from dtrain import alloc
    from dtrain.bench.workload import synthetic_batch, vocab
    from dtrain.kernels import for_arrays
    from dtrain.nn.model import CaptioningModel
    from dtrain.nn.optim import Adam

    model = CaptioningModel(vocab(50), input_dim=24, wordvec_dim=12, hidden_dim=20,
                            dtype=np.float32)
    adam = Adam(model.num_params, kernels=for_arrays(np, np.float32))
    features, captions = synthetic_batch(16, 9, 50, 24, np.random.default_rng(0))
    grads = model.forward_backward(features, model.pack(captions), 16)
    buffers = [model.param_buffer, model.grad_buffer, adam.m, adam.v, grads.embed_rows]
    buffers += list(model.ws._buffers.values())
    assert len(buffers) > 20
    misaligned = [b.shape for b in buffers if b.ctypes.data % alloc.HOST_ALIGNMENT]
    assert not misaligned
