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
    # shrinking after growing reuses buffers
    for M, W in ((1, 8), (37, 12), (1556, 256), (300, 256)):
        words = rng.integers(0, 60, M)
        dx = rng.standard_normal((M, W)).astype(dtype)
        ref_ids, ref_rows = layers.embedding_grad_sparse(words, dx)
        col_sum = np.full(W, np.nan, dtype)
        ids, rows = layers.embedding_grad_sparse(words, dx, k, 60, col_sum=col_sum)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(col_sum, _block_sums(rows))  # the rows' sums, in blocks
        tol = 1e-12 if dtype == np.float64 else 1e-4
        np.testing.assert_allclose(col_sum, dx.sum(axis=0), rtol=tol, atol=tol)
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(rows, ref_rows, rtol=tol, atol=tol)
        dense = np.zeros((60, W), dtype)
        np.add.at(dense, words, dx)
        np.testing.assert_allclose(rows, dense[ids], rtol=tol, atol=tol)
        # each word's row is its positions added in position order: the bits of that loop
        for w, row in zip(ids[:5], rows):
            acc = np.zeros(W, dtype)
            for x in dx[words == w]:
                acc += x
            np.testing.assert_array_equal(row, acc)


def _block_sums(rows):
    """The column sums of ``rows`` as the embedding kernel takes them: the rows of each block of
    PARTIAL_ROWS added in order, then the blocks in order."""
    from dtrain.kernels.cpu import PARTIAL_ROWS

    total = np.zeros(rows.shape[1], rows.dtype)
    for b in range(0, rows.shape[0], PARTIAL_ROWS):
        part = np.zeros(rows.shape[1], rows.dtype)
        for row in rows[b : b + PARTIAL_ROWS]:
            part += row
        total += part
    return total


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


def _ulps(got32, x32):
    """|got - exp(x)| in units of the float32 spacing at the float64 exp(x)."""
    ref = np.exp(x32.astype(np.float64))
    spacing = np.spacing(ref.astype(np.float32)).astype(np.float64)
    return np.abs(got32.astype(np.float64) - ref) / spacing


def test_exp32_accuracy():
    """Every 97th float32 in [-87, 88] (23 million values), the interval's ends and zero.

    DTRAIN_EXP32_STRIDE=1 checks all 2.24 billion (about a minute) and prints the worst
    and mean error: 1.088 and 0.063 ulp on the development machine (docs/performance.md).
    """
    import os

    k = CpuKernels(np.float32)
    stride = int(os.environ.get("DTRAIN_EXP32_STRIDE", "97"))
    lo, hi = int(np.float32(-87.0).view(np.uint32)), int(np.float32(88.0).view(np.uint32))
    worst, total, count = 0.0, 0.0, 0
    for first, last in ((0x80000000, lo), (0, hi)):  # negatives by bits from -0 down to -87
        for start in range(first, last + 1, stride << 22):
            stop = min(start + (stride << 22), last + 1)
            x = np.arange(start, stop, stride, dtype=np.uint32).view(np.float32)
            u = _ulps(k.exp32(x), x)
            worst, total, count = max(worst, float(u.max())), total + float(u.sum()), count + u.size
    print(f"exp32 over {count:,} float32: max {worst:.4f} ulp, mean {total / count:.4f}")
    # 1.1 ulp where the CPU fuses the polynomial's multiply-adds (FMA: every x86-64 since
    # 2013), 1.35 measured with separate multiplies and adds; NumPy's own float32 exp is
    # off by up to about 2.5
    assert worst <= 1.4 and total / count < 0.2
    ends = np.array([-87.0, -0.0, 0.0, 1e-30, 88.0], np.float32)
    assert _ulps(k.exp32(ends), ends).max() <= 1.4
    assert np.all(k.exp32(np.float32([0.0, -0.0])) == 1.0)


def test_exp32_polynomial_is_the_documented_fit():
    import math

    from dtrain.kernels import cpu

    r = np.cos(np.linspace(0, np.pi, 4000)) * math.log(2) / 2
    fit = np.polynomial.polynomial.polyfit(r, np.exp(r), 6)
    # the fit's float32 roundings are the constants, up to a last-bit difference that
    # another LAPACK may give
    np.testing.assert_allclose(np.float32(fit), np.float32(cpu.EXP_POLY), rtol=2 ** -22)
    # n * LN2_HI is exact in float32 for every n exp32 meets (|n| <= 127)
    n = np.arange(-128, 129, dtype=np.float32)
    assert np.all((n * np.float32(cpu.LN2_HI)).astype(np.float64)
                  == n.astype(np.float64) * cpu.LN2_HI)
    assert np.float32(cpu.LN2_LO) == np.float32(math.log(2) - cpu.LN2_HI)  # the rest, in float32


@pytest.mark.parametrize("H", [64, 67])
def test_float32_lstm_step_against_float64(H):
    # the float32 one-pass step (exp32, vector loop plus remainder at H=67) against the
    # float64 step on the same float32 inputs
    rng = np.random.default_rng(H)
    n = 5
    a = (rng.standard_normal((n, 4 * H)) * 4).astype(np.float32)
    a[0, :5] = [90, -90, 1e4, -1e4, 0]
    r = rng.standard_normal((n, 4 * H)).astype(np.float32)
    b = rng.standard_normal(4 * H).astype(np.float32)
    pc = rng.standard_normal((n, H)).astype(np.float32)
    outs = {}
    for dt in (np.float32, np.float64):
        aa = a.astype(dt)
        c, tc, h = (np.empty((n, H), dt) for _ in range(3))
        CpuKernels(dt).lstm_step_forward(aa, r.astype(dt), pc.astype(dt), c, tc, h, b.astype(dt))
        outs[dt] = (aa, c, tc, h)
    for got, ref in zip(outs[np.float32], outs[np.float64]):
        np.testing.assert_allclose(got, ref, rtol=3e-6, atol=3e-7)


def test_float32_softmax_against_float64_and_nan():
    rng = np.random.default_rng(5)
    M, V = 37, 1004
    scores = (rng.standard_normal((M, V)) * 6).astype(np.float32)
    scores[0, :3] = [200.0, -200.0, 0.0]
    scores[1, 7] = -0.0
    b = rng.standard_normal(V).astype(np.float32)
    targets = rng.integers(0, V, M)
    res = {}
    for dt in (np.float32, np.float64):
        s, g = scores.astype(dt), np.empty(V, dt)
        loss = CpuKernels(dt).softmax_cross_entropy(s, targets, 9.0, bias=b.astype(dt), bias_grad=g)
        res[dt] = (loss, s, g)
    assert abs(res[np.float32][0] - res[np.float64][0]) <= 1e-6 * abs(res[np.float64][0])
    np.testing.assert_allclose(res[np.float32][1], res[np.float64][1], rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(res[np.float32][2], res[np.float64][2], rtol=1e-4, atol=1e-7)
    k = CpuKernels(np.float32)
    for pos in (0, 500, 1003):  # a NaN anywhere in a row reaches the loss
        s = scores.copy()
        s[2, pos] = np.nan
        assert np.isnan(k.softmax_cross_entropy(s, targets, 9.0, bias=b))


def test_kernels_load_from_the_disk_cache(tmp_path):
    """A second process loads every kernel it uses from Numba's cache, compiles none.

    (Numba pickles the helpers a kernel calls into the cache key, with a uuid of their
    own per process unless dtrain fixes it: the kernels were compiled anew, 2 s, in
    every process.)
    """
    import os
    import subprocess
    import sys

    script = """
import numpy as np
from dtrain.nn.model import CaptioningModel
w2i = {"<NULL>": 0, "<START>": 1, "<END>": 2, **{f"w{i}": i for i in range(3, 20)}}
caps = np.array([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]], np.int32)
for dtype in (np.float32, np.float64):
    for cell in ("rnn", "lstm", "gru"):
        m = CaptioningModel(w2i, input_dim=6, wordvec_dim=4, hidden_dim=5, cell_type=cell,
                            dtype=dtype, seed=0, use_kernels=True)
        m.loss(np.ones((2, 6)), caps)
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    counts = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
        counts.append(sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.nbc")))
    assert counts[0], "nothing was cached"
    assert counts[1] == counts[0], sorted(set(counts[1]) - set(counts[0]))


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_float32_rnn_gru_steps_against_float64(cell):
    rng = np.random.default_rng(7)
    n, H = 4, 67
    G = H if cell == "rnn" else 3 * H
    a = (rng.standard_normal((n, G)) * 4).astype(np.float32)
    a[0, :4] = [90, -90, 1e4, -1e4]
    r = rng.standard_normal((n, G)).astype(np.float32)
    ph = rng.standard_normal((n, H)).astype(np.float32)
    outs = {}
    for dt in (np.float32, np.float64):
        k, aa = CpuKernels(dt), a.astype(dt)
        if cell == "rnn":
            k.rnn_step_forward(aa, r.astype(dt))
            outs[dt] = (aa,)
        else:
            hn, h = np.empty((n, H), dt), np.empty((n, H), dt)
            k.gru_step_forward(aa, r.astype(dt), ph.astype(dt), hn, h)
            outs[dt] = (aa, hn, h)
    for got, ref in zip(outs[np.float32], outs[np.float64]):
        np.testing.assert_allclose(got, ref, rtol=3e-6, atol=3e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_kernel(dtype):
    k = CpuKernels(dtype)
    big = np.finfo(dtype).max
    for size in (1, 3, 7, 8, 9, 17, 1001):
        a = np.full(size, big, dtype)  # finite, however large (a sum would overflow)
        a[::2] = -big
        assert k.all_finite(a)
        # each of the kernel's eight streams, the last entry of each, and the tail
        starts = {q * size // 8 for q in range(8)}
        lasts = {(q + 1) * (size // 8) - 1 for q in range(8)}
        for pos in starts | lasts | {size - 1}:
            if pos < 0:
                continue
            for bad in (np.nan, np.inf, -np.inf):
                b = a.copy()
                b[pos] = bad
                assert not k.all_finite(b), (size, pos, bad)
    m = np.zeros((6, 5), dtype)
    m[4, 3] = np.nan
    assert not k.all_finite(m) and k.all_finite(m[:4])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H", [37, 512])
def test_lstm_backward_kernel_in_place_bit_for_bit(dtype, H):
    # The packed LSTM backward lets the CPU kernel write the gate gradients over the
    # gates (d is a): the same bits as the step's formulas evaluated by NumPy (same
    # operation order, no contraction), and, into a separate d, the same again.
    k = CpuKernels(dtype)
    assert k.capabilities.backward_in_place
    rng = np.random.default_rng(H)
    n, n_next = 29, 17
    gates = rng.uniform(0.01, 0.99, (n, 4 * H)).astype(dtype)
    gates[:, 3 * H :] = rng.uniform(-0.99, 0.99, (n, H))
    prev_c, tc, dh_up = (rng.standard_normal((n, H)).astype(dtype) for _ in range(3))
    dh_rec, dc_rec = (rng.standard_normal((n, H)).astype(dtype) for _ in range(2))
    one = dtype(1.0)
    i, f, o, g = (gates[:, q * H : (q + 1) * H] for q in range(4))
    dh_in, dc_in = dh_rec.copy(), dc_rec.copy()
    dh_in[n_next:], dc_in[n_next:] = 0, 0  # rows whose caption ends here carry nothing back
    dh = dh_up + dh_in
    dc = dc_in + dh * o * (one - tc * tc)
    want = np.concatenate([dc * g * i * (one - i), dc * prev_c * f * (one - f),
                           dh * tc * o * (one - o), dc * i * (one - g * g)], axis=1)

    a, dh1, dc1 = gates.copy(), dh_rec.copy(), dc_rec.copy()
    k.lstm_step_backward(a, dh_up, dh1, dc1, n_next, a, prev_c, tc)
    assert np.array_equal(a, want) and np.array_equal(dc1, dc * f)
    assert not dh1[n_next:].any()
    d, a2, dh2, dc2 = np.full_like(gates, np.nan), gates.copy(), dh_rec.copy(), dc_rec.copy()
    k.lstm_step_backward(d, dh_up, dh2, dc2, n_next, a2, prev_c, tc)
    assert np.array_equal(d, want) and np.array_equal(a2, gates) and np.array_equal(dc2, dc1)


def test_recurrence_plan_from_capabilities():
    # one plan per shape from the kernel set's capabilities: the backward's variant is its
    # own (a non-contiguous h0 stops the accumulating forward, not the compiled backward)
    from dtrain.kernels.base import Capabilities, KernelSet, RecurrencePlan, plan_lstm

    full = Capabilities(True, True, True, True, True)
    everything = RecurrencePlan(True, True, True, True, True, True, 2)
    assert plan_lstm(full, host=True, contiguous=True, parts=2) == everything
    apart = plan_lstm(full, host=True, contiguous=False)
    assert not apart.accumulate and not apart.compiled_forward and apart.compiled_backward
    on_gpu = plan_lstm(full, host=False, contiguous=True)
    assert on_gpu.compiled_forward and not on_gpu.reads_transposed and not on_gpu.compiled_backward
    assert plan_lstm(Capabilities(), True, True) == RecurrencePlan()  # a set that declares nothing
    for bad in ({"accumulate": True}, {"compiled_forward": True, "copies_prev_h": True},
                {"reads_transposed": True}, {"compiled_backward": True, "in_place": True}):
        with pytest.raises(ValueError, match="needs"):
            RecurrencePlan(**bad)
    k = CpuKernels(np.float32)
    h0, Wh = np.zeros((3, 4), np.float32), np.zeros((4, 16), np.float32)
    plan = k.lstm_plan(h0, Wh)
    assert plan is k.lstm_plan(h0, Wh)  # built once per shape
    assert plan.in_place and plan.copies_prev_h
    assert k.lstm_plan(h0, np.asfortranarray(Wh)).accumulate is False
    fixed = k.with_plan(RecurrencePlan())
    assert fixed.lstm_plan(h0, Wh) == RecurrencePlan() and k.lstm_plan(h0, Wh) is plan
    assert isinstance(k, KernelSet)


def test_a_gemm_plugged_into_the_kernel_set_makes_every_gemm_of_the_step():
    # the seam for another precision or library: a Gemm subclass given to the kernel set
    # gets every GEMM of a training step (the compiled loops step aside, since their sgemm
    # is not its arithmetic), and the step computes the same function
    from dtrain.kernels.gemm import Gemm
    from dtrain.nn.model import CaptioningModel

    class CountingGemm(Gemm):
        def __init__(self):
            self.calls = []

        def _matmul(self, a, b, out):
            self.calls.append("matmul")
            return super()._matmul(a, b, out)

        def _transposed(self, a, b, out):
            self.calls.append("transposed")
            return super()._transposed(a, b, out)

    w2i = {"<NULL>": 0, "<START>": 1, "<END>": 2, **{f"w{i}": i for i in range(3, 20)}}
    caps = np.array([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 9, 9, 2, 0, 0]], np.int32)
    feats = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    results = []
    for gemm in (None, CountingGemm()):
        m = CaptioningModel(w2i, input_dim=6, wordvec_dim=4, hidden_dim=5, cell_type="lstm",
                            dtype=np.float32, seed=0, use_kernels=True)
        m.kernels = CpuKernels(np.float32, gemm=gemm)
        assert m.gemm is m.kernels.gemm
        plan = m.kernels.lstm_plan(np.zeros((3, 5), np.float32), np.zeros((5, 20), np.float32))
        expect = (True, True) if gemm is None else (False, False)
        assert (plan.compiled_forward, plan.accumulate) == expect
        results.append(m.loss(feats, caps))
    T = 4  # time steps of the longest caption
    # h0, T recurrent products, scores, dW_vocab, dscored, T recurrent backward ones, dWx, dWh,
    # dW_proj and dx (loss() asks for the input gradient), the input projection
    assert len(gemm.calls) == 2 * T + 9 and gemm.calls.count("transposed") == T
    (loss0, grads0), (loss1, grads1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)
