"""Fused CPU kernels against the plain xp reference."""

import numpy as np
import pytest

from dtrain.kernels.cpu import CpuKernels
from dtrain.nn import layers
from dtrain.nn.model import CaptioningModel
from dtrain.nn.optim import Adam

numba = pytest.importorskip("numba")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-4)])
def test_model_with_kernels_matches_plain(cell, dtype, tol):
    rng = np.random.default_rng(0)
    w2i = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, **{f"w{i}": i for i in range(4, 50)}}
    fast = CaptioningModel(w2i, input_dim=16, wordvec_dim=12, hidden_dim=20, cell_type=cell,
                           dtype=dtype, seed=1, use_kernels=True)
    plain = CaptioningModel(w2i, input_dim=16, wordvec_dim=12, hidden_dim=20, cell_type=cell,
                            dtype=dtype, seed=1, use_kernels=False)
    assert fast.kernels is not None and plain.kernels is None
    caps = np.zeros((11, 13), np.int32)
    for n in range(11):
        L = rng.integers(1, 11)
        caps[n, 0], caps[n, 1 : L + 1], caps[n, L + 1] = 1, rng.integers(3, 50, L), 2
    caps[3, 2] = 0
    feats = rng.standard_normal((11, 16))
    lf, gf = fast.loss(feats, caps)
    lp, gp = plain.loss(feats, caps)
    assert abs(lf - lp) <= tol * abs(lp)
    for k in gp:
        assert np.max(np.abs(gf[k] - gp[k])) <= tol * np.max(np.abs(gp[k])), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_kernel_extreme_values(dtype):
    k = CpuKernels(dtype)
    scores = np.array([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-50, 50, 3]], dtype=dtype)
    targets = np.array([1, 2, 0])
    ref_loss, ref_d = layers.softmax_cross_entropy(scores.copy(), targets, 3)
    s = scores.copy()
    loss = k.softmax_cross_entropy(s, targets, 3)
    assert np.isfinite(loss) and np.all(np.isfinite(s))
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    np.testing.assert_allclose(s, ref_d, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_matches_plain(dtype):
    rng = np.random.default_rng(3)
    n = 5000
    p1 = rng.standard_normal(n).astype(dtype)
    p2 = p1.copy()
    a1 = Adam(n, lr=3e-3, dtype=dtype, kernels=CpuKernels(dtype))
    a2 = Adam(n, lr=3e-3, dtype=dtype)
    for _ in range(4):
        g = rng.standard_normal(n).astype(dtype)
        a1.step(p1, g)
        a2.step(p2, g)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(p1, p2, rtol=tol, atol=tol)
    np.testing.assert_allclose(a1.m, a2.m, rtol=tol, atol=tol)


def test_lstm_kernel_saturated_gates_finite():
    k = CpuKernels(np.float32)
    H = 4
    a = np.full((2, 4 * H), 1e4, np.float32)
    a[1] = -1e4
    r = np.zeros_like(a)
    c, tc, h = (np.empty((2, H), np.float32) for _ in range(3))
    k.lstm_step_forward(a, r, np.zeros((2, H), np.float32), c, tc, h, np.zeros(4 * H, np.float32))
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(c))
    assert np.all(a[0] == 1.0) and np.all(a[1, : 3 * H] < 1e-30) and np.all(a[1, 3 * H :] == -1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_grad_kernel_matches_sorting_path(dtype):
    k = CpuKernels(dtype)
    rng = np.random.default_rng(5)
    for M, W in ((1, 8), (37, 12), (1556, 256), (300, 256)):  # shrinking after growing reuses buffers
        words = rng.integers(0, 60, M)
        dx = rng.standard_normal((M, W)).astype(dtype)
        ref_ids, ref_rows = layers.embedding_grad_sparse(words, dx)
        col_sum = np.full(W, np.nan, dtype)
        ids, rows = layers.embedding_grad_sparse(words, dx, k, 60, col_sum=col_sum)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(col_sum, dx.sum(axis=0))  # the same pass, the same bits
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(rows, ref_rows, rtol=tol, atol=tol)
        dense = np.zeros((60, W), dtype)
        np.add.at(dense, words, dx)
        np.testing.assert_allclose(rows, dense[ids], rtol=tol, atol=tol)
        assert np.all(k._slot == -1)  # the word -> row map is left clean for the next call


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_kernel_wide_rows_match_plain(dtype):
    # rows longer than the 8-way max and sum chains, and a length that leaves a remainder
    rng = np.random.default_rng(7)
    for V in (8, 17, 1003):
        scores = (rng.standard_normal((29, V)) * 4).astype(dtype)
        targets = rng.integers(0, V, 29)
        ref_loss, ref_d = layers.softmax_cross_entropy(scores.copy(), targets, 7)
        s = scores.copy()
        loss = CpuKernels(dtype).softmax_cross_entropy(s, targets, 7)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        assert abs(loss - ref_loss) <= tol * abs(ref_loss)
        np.testing.assert_allclose(s, ref_d, rtol=tol, atol=tol * np.abs(ref_d).max())
        # the bias folded in, and its gradient summed in the same pass
        bias = rng.standard_normal(V).astype(dtype)
        s2, db = scores.copy(), np.full(V, np.nan, dtype)
        loss2 = CpuKernels(dtype).softmax_cross_entropy(s2, targets, 7, bias=bias, bias_grad=db)
        ref_loss2, ref_d2 = layers.softmax_cross_entropy(scores + bias, targets, 7)
        assert abs(loss2 - ref_loss2) <= tol * abs(ref_loss2)
        np.testing.assert_allclose(s2, ref_d2, rtol=tol, atol=tol * np.abs(ref_d2).max())
        np.testing.assert_array_equal(db, s2.sum(axis=0))
