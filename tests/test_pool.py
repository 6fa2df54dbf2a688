"""The shared pool (OpenBLAS's jobs on Numba's threads) and the kernels split across it.

Splitting and pooling are only worth having if they give the bits the serial kernels
and OpenBLAS's own threads give: every test here compares numbers exactly.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from dtrain.kernels import cpu, pool  # noqa: E402
from dtrain.kernels.base import RecurrencePlan  # noqa: E402
from dtrain.kernels.cpu import CpuKernels, dispatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the serial kernels and their split forms, by the names the tests use
_KERNELS = {"lstm_fwd32": "cells", "lstm_fwd32_acc": "cells", "lstm_bwd_in_place": "cells",
            "softmax_xent32": "softmax", "sum_partials": "softmax", "embed_rows": "embedding",
            "embed_group": "embedding", "adam": "adam", "count_nonfinite": "fixedpoint",
            "gather_rows": "rows", "scatter_rows": "rows", "scatter_ids": "rows",
            "prev_h_rows": "rows"}
_SPLIT_NAMES = {"lstm_bwd_in_place": "lstm_bwd_split"}


def _lstm_inputs(rng, batch_sizes, W, H):
    """float32 (x, h0, Wx, Wh, b) of a packed LSTM batch, and dH."""
    total, n0 = sum(batch_sizes), batch_sizes[0]
    args = [rng.standard_normal((total, W)), rng.standard_normal((n0, H)),
            0.3 * rng.standard_normal((W, 4 * H)), 0.3 * rng.standard_normal((H, 4 * H)),
            rng.standard_normal(4 * H)]
    return [a.astype(np.float32) for a in args], rng.standard_normal((total, H)).astype(np.float32)


def _module(name):
    import importlib

    return importlib.import_module(f"dtrain.kernels.cpu.{_KERNELS[name]}")


SERIAL = SimpleNamespace(**{name: getattr(_module(name), name) for name in _KERNELS})


def _split():
    names = [n for n in _KERNELS if n not in ("sum_partials", "embed_group")]
    return SimpleNamespace(**{n: getattr(_module(n), _SPLIT_NAMES.get(n, n + "_split"))
                              for n in names})


def _compiled():
    """The BLAS FFI and the compiled loops in one namespace."""
    from dtrain.kernels.cpu import blas, kernels

    return SimpleNamespace(**vars(blas.ffi()), **vars(kernels._loops()))


def _lstm_step_inputs(rng, n, H):
    """Pre-activations (n, 4H), their bias (4H,) and c_{t-1} (n, H), float32."""
    return (rng.standard_normal((n, 4 * H)).astype(np.float32),
            rng.standard_normal(4 * H).astype(np.float32),
            rng.standard_normal((n, H)).astype(np.float32))


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("n_next", [0, 5, 13, 17])
def test_split_lstm_steps_bitwise(parts, n_next):
    rng = np.random.default_rng(parts * 100 + n_next)
    s = _split()
    k = SERIAL
    n, H = 17, 40
    a0, b, prev_c = _lstm_step_inputs(rng, n, H)
    r = rng.standard_normal((n, 4 * H)).astype(np.float32)
    outs = []
    for fwd in (lambda *x: k.lstm_fwd32(*x), lambda *x: s.lstm_fwd32(parts, *x)):
        a, c, tc, h = a0.copy(), *(np.empty((n, H), np.float32) for _ in range(3))
        h_next = np.full((n_next, H), np.nan, np.float32)  # the next step's prev_h rows
        fwd(a, r, b, prev_c, c, tc, h, h_next, n_next, np.zeros(4 * H, np.float32))
        assert np.array_equal(h_next, h[:n_next])
        outs.append((a, c, tc, h))
    for x, y in zip(*outs):
        assert np.array_equal(x, y)
    a, _, tc, _ = outs[0]
    dh_up = rng.standard_normal((n, H)).astype(np.float32)
    dh_rec0 = rng.standard_normal((n + 3, H)).astype(np.float32)
    dc_rec0 = rng.standard_normal((n + 3, H)).astype(np.float32)
    back = []
    bwds = [lambda *x: k.lstm_bwd_in_place(*x), lambda *x: s.lstm_bwd_in_place(parts, *x)]
    t = _compiled()
    address = t.addresses.get(np.dtype(np.float32))
    if address is not None:  # dh_rec's first n_next rows given transposed, copied by the kernel
        dh_rec_T = np.ascontiguousarray(dh_rec0[:n_next].T)
        bwds.append(lambda d, dh_up, dh_rec, *x: (
            dh_rec[:n_next].fill(np.nan),
            t.lstm_bwd_T(address, dh_rec_T, d, dh_up, dh_rec, *x)))
        bwds.append(lambda d, dh_up, dh_rec, *x: (
            dh_rec[:n_next].fill(np.nan),
            t.lstm_bwd_T_split(parts, address, dh_rec_T, d, dh_up, dh_rec, *x)))
    for bwd in bwds:
        d, dh_rec, dc_rec = a.copy(), dh_rec0.copy(), dc_rec0.copy()
        bwd(d, dh_up, dh_rec, dc_rec, n_next, prev_c, tc)
        back.append((d, dh_rec, dc_rec))
    assert len(back) == 4 or _compiled().addresses == {}
    for other in back[1:]:
        for x, y in zip(back[0], other):
            assert np.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("parts", [2, 3])
def test_split_softmax_embedding_adam_finite_bitwise(parts):
    rng = np.random.default_rng(parts)
    s = _split()
    k = SERIAL
    M, V = 203, 71  # rows in 4 blocks of partial column sums, the last one short
    scores0 = (3 * rng.standard_normal((M, V))).astype(np.float32)
    b = rng.standard_normal(V).astype(np.float32)
    targets = rng.integers(0, V, M)
    results = []
    blocks = -(-M // cpu.PARTIAL_ROWS)
    for sm in (lambda *x: k.softmax_xent32(*x), lambda *x: s.softmax_xent32(parts, *x)):
        scores, row_loss = scores0.copy(), np.empty(M)
        partials, col_sum = np.full((blocks, V), np.nan, np.float32), np.full(V, 7, np.float32)
        sm(scores, b, targets, 1 / 9, row_loss, partials)
        k.sum_partials(partials, col_sum)
        results.append((scores, row_loss, col_sum))
    for x, y in zip(*results):
        assert np.array_equal(x, y)
    scores, _, col_sum = results[0]
    np.testing.assert_allclose(col_sum, scores.astype(np.float64).sum(axis=0), rtol=0, atol=1e-6)
    kern = CpuKernels(np.float32)  # the method: the same sums, and none asked for
    scores, bias_grad = scores0.copy(), np.full(V, np.nan, np.float32)
    loss = kern.softmax_cross_entropy(scores, targets, 9, bias=b, bias_grad=bias_grad)
    assert np.array_equal(scores, results[0][0]) and np.array_equal(bias_grad, col_sum)
    assert loss == pytest.approx(results[0][1].sum() / 9, rel=1e-12)
    scores = scores0.copy()
    assert kern.softmax_cross_entropy(scores, targets, 9, bias=b) == loss

    # 300 words (5 blocks of partial sums), a few of them frequent: the parts differ in size
    words = np.concatenate([rng.integers(0, 300, 900), rng.integers(0, 4, 300)]).astype(np.int32)
    rng.shuffle(words)
    M = words.size
    dx = rng.standard_normal((M, 70)).astype(np.float32)
    counts, ids = np.empty(301, np.int64), np.empty(M, np.int64)
    starts, order = np.empty(M + 1, np.int64), np.empty(M, np.int64)
    count = k.embed_group(words, counts, ids, starts, order)
    assert np.array_equal(ids[:count], np.unique(words))
    assert np.array_equal(order, np.argsort(words, kind="stable")) and starts[count] == M
    blocks = -(-count // cpu.PARTIAL_ROWS)
    rows_a, rows_b = np.full((M, 70), np.nan, np.float32), np.full((M, 70), np.nan, np.float32)
    part_a, part_b = np.empty((blocks, 70), np.float32), np.empty((blocks, 70), np.float32)
    k.embed_rows(dx, order, starts, rows_a, part_a, 0, count)
    s.embed_rows(parts, dx, order, starts, rows_b, part_b, count)
    assert np.array_equal(rows_a[:count], rows_b[:count]) and np.array_equal(part_a, part_b)
    expect = np.zeros((count, 70), np.float32)
    np.add.at(expect, np.searchsorted(ids[:count], words), dx)
    np.testing.assert_allclose(rows_a[:count], expect, rtol=1e-5, atol=1e-5)

    n = 1001
    state = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    state[3] = np.abs(state[3])
    a, bb = [x.copy() for x in state], [x.copy() for x in state]
    k.adam(*a, 1e-3, 0.9, 0.999, 1e-8, 0.3, 0.01)
    s.adam(parts, *bb, 1e-3, 0.9, 0.999, 1e-8, 0.3, 0.01)
    for x, y in zip(a, bb):
        assert np.array_equal(x, y)

    g = rng.standard_normal(n).astype(np.float32)
    bits = g.view(np.int32)
    assert s.count_nonfinite(parts, bits, np.int32(0x7F800000)) == 0
    for pos in (0, n // 3, n // 2, n - 1):  # one in every part
        g[pos] = np.inf if pos % 2 else np.nan
    assert s.count_nonfinite(parts, bits, np.int32(0x7F800000)) == 4


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_row_gather_and_scatter(parts):
    rng = np.random.default_rng(5)
    s = _split()
    src = rng.standard_normal((40, 24)).astype(np.float32)
    idx = rng.integers(0, 40, 61)
    out = np.empty((61, 24), np.float32)
    assert s.gather_rows(parts, src, idx, out) == 0
    assert np.array_equal(out, src[idx])
    pos = np.sort(rng.choice(61, 25, replace=False))
    rows = rng.standard_normal((25, 24)).astype(np.float32)
    dense = np.full((61, 24), np.nan, np.float32)
    s.scatter_rows(parts, rows, pos, dense)
    expect = np.zeros((61, 24), np.float32)
    expect[pos] = rows
    assert np.array_equal(dense, expect)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_scatter_ids_fills_the_dense_embedding_gradient(parts):
    rng = np.random.default_rng(parts)
    ids = rng.choice(50, 19, replace=False)  # distinct, in no order
    rows = rng.standard_normal((19, 12)).astype(np.float32)
    rows[0, 0] = -0.0
    expect = np.zeros((50, 12), np.float32)
    expect[ids] = rows
    dense = np.full((50, 12), np.nan, np.float32)
    _split().scatter_ids(parts, rows, ids, dense)
    assert np.array_equal(dense.view(np.uint32), expect.view(np.uint32))
    k = CpuKernels(np.float32)
    dense2 = np.full((50, 12), np.nan, np.float32)
    assert k.scatter_ids(rows, ids, dense2) is dense2 and np.array_equal(dense2, expect)
    with pytest.raises(IndexError, match="index 50 is out of bounds for axis 0 with size 50"):
        k.scatter_ids(rows[:2], np.array([3, 50]), dense2)


def test_compiled_packing_matches_numpy():
    from dtrain.nn.model import pack_captions

    k = CpuKernels(np.float32)
    rng = np.random.default_rng(0)
    for trial in range(200):
        N, T1 = int(rng.integers(0, 20)), int(rng.integers(2, 9))
        caps = rng.integers(0, 4, size=(N, T1)).astype([np.int64, np.int32, np.uint16][trial % 3])
        if trial % 7 == 0:
            caps[:] = 0  # no real token anywhere
        a, b = pack_captions(caps, 0), pack_captions(caps, 0, k)
        assert a.batch_sizes == b.batch_sizes and a.num_tokens == b.num_tokens
        for name in ("order", "words_in", "targets", "score_pos"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype and np.array_equal(x, y), (trial, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lstm_prev_h_written_forward_and_dh_rec_read_transposed_keep_the_bits(dtype, monkeypatch):
    # the forward steps writing prev_h and the backward steps copying their dh_rec rows from
    # the recurrent GEMM's transposed result against a copy pass for each (steps above and
    # below TRANSPOSED_BACKWARD_ROWS)
    from dtrain.nn import layers
    from dtrain.nn.cells import lstm

    rng = np.random.default_rng(1)
    batch_sizes, W, H = [150, 140, 128, 100, 37, 3, 1], 10, 16
    total = sum(batch_sizes)
    x = rng.standard_normal((total, W)).astype(dtype)
    h0 = rng.standard_normal((150, H)).astype(dtype)
    Wx = (0.3 * rng.standard_normal((W, 4 * H))).astype(dtype)
    Wh = (0.3 * rng.standard_normal((H, 4 * H))).astype(dtype)
    b = rng.standard_normal(4 * H).astype(dtype)
    dH = rng.standard_normal((total, H)).astype(dtype)
    k = CpuKernels(dtype)
    results = []
    # no accumulating GEMM (another sum order: below)
    reads_T = k.lstm_plan(h0, Wh).reads_transposed
    for on in (True, False):
        plan = RecurrencePlan(copies_prev_h=on, in_place=True, reads_transposed=on and reads_T)
        kp = k.with_plan(plan)
        ws = layers.Workspace()
        Hp, cache = lstm.lstm_packed_forward(x, h0, Wx, Wh, b, batch_sizes, ws, kp)
        assert (cache[-1] is not None) == on
        out = (np.empty((W, 4 * H), dtype), np.empty((H, 4 * H), dtype), np.empty(4 * H, dtype))
        grads = lstm.lstm_packed_backward(dH, cache, ws, kp, out=out)
        results.append([Hp.copy()] + [np.array(g, copy=True) for g in grads])
    for x_on, x_off in zip(*results):
        assert np.array_equal(x_on, x_off)


def test_recurrent_gemm_adding_to_the_gates_matches_the_separate_product(monkeypatch):
    # float32: h Wh added to the gate rows by the GEMM (beta = 1), then (a + b): another
    # rounding order than (x Wx + b) + h Wh, the same numbers to float32 precision
    from dtrain.nn import layers
    from dtrain.nn.cells import lstm

    k = CpuKernels(np.float32)
    assert k.capabilities.gemm_accumulates == (np.dtype(np.float32) in _compiled().gemm_addresses)
    if not k.capabilities.gemm_accumulates:
        pytest.skip("no OpenBLAS sgemm found: the accumulating path is not offered")
    rng = np.random.default_rng(2)
    batch_sizes, W, H = [40, 40, 33, 20, 1], 12, 24
    total = sum(batch_sizes)
    x = rng.standard_normal((total, W)).astype(np.float32)
    h0 = rng.standard_normal((40, H)).astype(np.float32)
    Wx = (0.3 * rng.standard_normal((W, 4 * H))).astype(np.float32)
    Wh = (0.3 * rng.standard_normal((H, 4 * H))).astype(np.float32)
    b = rng.standard_normal(4 * H).astype(np.float32)
    outs = []
    for on in (True, False):
        kp = k.with_plan(RecurrencePlan(copies_prev_h=True, accumulate=on, in_place=True))
        Hp, cache = lstm.lstm_packed_forward(x, h0, Wx, Wh, b, batch_sizes, layers.Workspace(), kp)
        outs.append((Hp.copy(), cache[4].copy(), cache[5].copy()))  # h, activated gates, c
    for acc, sep in zip(*outs):
        np.testing.assert_allclose(acc, sep, rtol=1e-5, atol=1e-6)
    # against float64 (the plain layers)
    Hp64, _ = lstm.lstm_packed_forward(*(v.astype(np.float64) for v in (x, h0, Wx, Wh, b)),
                                       batch_sizes)
    np.testing.assert_allclose(outs[0][0], Hp64, rtol=1e-4, atol=1e-5)
    # the GEMM itself: out += a @ b, and the NumPy fallback for what it does not take
    a, bm = x[:7], Wx
    out = rng.standard_normal((7, 4 * H)).astype(np.float32)
    expect = out.astype(np.float64) + a.astype(np.float64) @ bm.astype(np.float64)
    got = k.gemm.accumulate(a, bm, out.copy())
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    strided = np.asfortranarray(out)
    assert k.gemm.accumulate(a, bm, strided) is strided
    np.testing.assert_allclose(strided, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_compiled_forward_loop_gives_the_python_loops_bits(parts, monkeypatch):
    # the LSTM's forward time loop in one compiled call (serial, and split across 2 and 3
    # parts with every step split) against the cell's Python loop over the same kernels
    from dtrain.nn import layers
    from dtrain.nn.cells import lstm

    k = CpuKernels(np.float32)
    if not k.capabilities.compiled_loops:
        pytest.skip("no OpenBLAS sgemm found: the compiled loops are not offered")
    rng = np.random.default_rng(parts)
    batch_sizes, W, H = [30, 30, 27, 11, 1], 12, 16
    total = sum(batch_sizes)
    args = [rng.standard_normal((total, W)), rng.standard_normal((30, H)),
            0.3 * rng.standard_normal((W, 4 * H)), 0.3 * rng.standard_normal((H, 4 * H)),
            rng.standard_normal(4 * H)]
    args = [a.astype(np.float32) for a in args]
    if parts > 1:
        monkeypatch.setattr(pool, "threads", lambda: parts)
        monkeypatch.setattr(dispatch, "SPLIT_MIN_ELEMENTS", 0)
    outs = []
    plan = k.lstm_plan(args[1], args[3])
    assert plan.compiled_forward and plan.parts == parts
    for compiled in (True, False):
        kp = k.with_plan(replace(plan, compiled_forward=compiled))
        Hp, cache = lstm.lstm_packed_forward(*args, batch_sizes, layers.Workspace(), kp)
        outs.append([Hp.copy()] + [np.array(x, copy=True)
                                   for x in (cache[4], cache[5], cache[6], cache[-1])])
    for x, y in zip(*outs):
        assert np.array_equal(x, y)
    assert CpuKernels.ticks_to_seconds(0) == 0 and CpuKernels.ticks_to_seconds(10**9) > 0


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_compiled_backward_loop_gives_the_python_loops_bits(parts, monkeypatch):
    # the LSTM's backward time loop in one compiled call against the cell's Python loop over
    # the same kernels and GEMMs: steps above the transposed-GEMM threshold (d Wh^T into
    # dh_rec), below it (Wh d^T left transposed), one-row steps, a first step of either kind
    from dtrain.nn import layers
    from dtrain.nn.cells import lstm

    k = CpuKernels(np.float32)
    if not k.capabilities.compiled_loops:
        pytest.skip("no OpenBLAS sgemm found: the compiled loops are not offered")
    if parts > 1:
        monkeypatch.setattr(pool, "threads", lambda: parts)
        monkeypatch.setattr(dispatch, "SPLIT_MIN_ELEMENTS", 0)
    W, H = 10, 16
    for batch_sizes in ([140, 131, 128, 40, 2, 1], [9, 9, 5, 1, 1]):
        args, dH = _lstm_inputs(np.random.default_rng(parts + len(batch_sizes)), batch_sizes,
                                W, H)
        outs = []
        plan = k.lstm_plan(args[1], args[3])
        assert plan.compiled_backward and plan.parts == parts
        for compiled in (True, False):
            kp = k.with_plan(replace(plan, compiled_backward=compiled))
            ws = layers.Workspace()
            _, cache = lstm.lstm_packed_forward(*args, batch_sizes, ws, kp)
            out = (np.empty((W, 4 * H), np.float32), np.empty((H, 4 * H), np.float32),
                   np.empty(4 * H, np.float32))
            grads = lstm.lstm_packed_backward(dH, cache, ws, kp, out=out)
            outs.append([np.array(g, copy=True) for g in grads])
        for x, y in zip(*outs):
            assert np.array_equal(x, y)
        # and the float64 plain layers agree to float32 precision
        _, cache64 = lstm.lstm_packed_forward(*(a.astype(np.float64) for a in args), batch_sizes)
        grads64 = lstm.lstm_packed_backward(dH.astype(np.float64), cache64)
        for g32, g64 in zip(outs[0], grads64):
            np.testing.assert_allclose(g32, g64, rtol=2e-4, atol=2e-4)


def test_gemm_transposed_matches_numpy():
    k = CpuKernels(np.float32)
    rng = np.random.default_rng(0)
    for m, n in ((7, 5), (1, 5), (7, 1), (128, 64)):
        a = rng.standard_normal((m, 33)).astype(np.float32)
        b = rng.standard_normal((n, 33)).astype(np.float32)
        out = np.full((m, n), np.nan, np.float32)
        assert k.gemm.transposed(a, b, out) is out
        np.testing.assert_allclose(out, a.astype(np.float64) @ b.T.astype(np.float64),
                                   rtol=1e-5, atol=1e-5)
        if m > 1 and n > 1:  # the call numpy.matmul makes: the same bits
            assert np.array_equal(out, a @ b.T)
    rows = np.empty((7, 9), np.float32)[:, :5]  # rows farther apart than their length: still sgemm
    a = rng.standard_normal((7, 33)).astype(np.float32)
    b = rng.standard_normal((5, 33)).astype(np.float32)
    assert np.array_equal(k.gemm.transposed(a, b, rows), a @ b.T)


@pytest.mark.parametrize("parts", [2, 3])
def test_split_lstm_forward_accumulated_bitwise(parts):
    rng = np.random.default_rng(parts)
    s, k = _split(), SERIAL
    n, H, n_next = 17, 40, 9
    a0, b, prev_c = _lstm_step_inputs(rng, n, H)
    outs = []
    for fwd in (lambda *x: k.lstm_fwd32_acc(*x), lambda *x: s.lstm_fwd32_acc(parts, *x)):
        a, c, tc, h = a0.copy(), *(np.empty((n, H), np.float32) for _ in range(3))
        h_next = np.empty((n_next, H), np.float32)
        fwd(a, b, prev_c, c, tc, h, h_next, n_next)
        outs.append((a, c, tc, h, h_next))
    for x, y in zip(*outs):
        assert np.array_equal(x, y)
    # the same gates as lstm_fwd32 with the recurrent part in r = 0
    a, c, tc, h = a0.copy(), *(np.empty((n, H), np.float32) for _ in range(3))
    k.lstm_fwd32(a, np.zeros_like(a0), b, prev_c, c, tc, h, np.empty((0, H), np.float32), 0,
                 np.zeros(4 * H, np.float32))
    for x, y in zip((a, c, tc, h), outs[0]):
        assert np.array_equal(x, y)


def test_gather_rows_out_of_range_is_an_index_error():
    k = CpuKernels(np.float32)
    src = np.ones((5, 3), np.float32)
    with pytest.raises(IndexError, match="index 7 is out of bounds for axis 0 with size 5"):
        k.gather_rows(src, np.array([1, 7, 2]), np.empty((3, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 4, 37, 128])
def test_copy_transposed_bitwise(dtype, n):
    k = CpuKernels(dtype)
    src = np.random.default_rng(n).standard_normal((512, n)).astype(dtype)
    src[0, 0], src[-1, -1] = -0.0, np.nan
    out = np.empty((n, 512), dtype)
    k.copy_transposed(src, out)
    assert np.array_equal(out.view(np.uint8), np.ascontiguousarray(src.T).view(np.uint8))
    strided = np.empty((n, 1024), dtype)[:, ::2]  # not contiguous: NumPy's copy
    k.copy_transposed(src, strided)
    assert np.array_equal(strided, src.T, equal_nan=True)


_STEP_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    from dtrain import backend
    from dtrain.kernels import pool
    from dtrain.kernels.cpu import dispatch
    from dtrain.nn.model import CaptioningModel
    from dtrain.nn.optim import Adam
    from dtrain.kernels import for_arrays
    sys.path.insert(0, "tests")
    from helpers import random_captions, small_vocab

    backend.set_threads(2)
    dispatch.SPLIT_MIN_ELEMENTS = 0  # every kernel call splits, however small
    rng = np.random.default_rng(0)
    model = CaptioningModel(small_vocab(60), 48, 24, 64, "lstm", dtype=np.float32, seed=3)
    adam = Adam(model.num_params, dtype=np.float32, kernels=for_arrays(np, np.float32))
    digest = hashlib.sha256()
    for _ in range(3):
        caps = random_captions(rng, 96, 12, 60)
        feats = rng.standard_normal((96, 48)).astype(np.float32)
        grads = model.forward_backward(feats, model.pack(caps), 96)
        digest.update(np.float64(grads.loss).tobytes())
        digest.update(model.grad_buffer.tobytes())
        digest.update(grads.embed_rows.tobytes())
        digest.update(np.asarray(grads.embed_ids).tobytes())
        adam.step(model.param_buffer, model.grad_buffer)
        digest.update(model.param_buffer.tobytes())
    a = rng.standard_normal((300, 200)).astype(np.float32)
    digest.update((a @ a.T).tobytes())
    print(json.dumps({"shared": pool.shared(), "status": pool.status(),
                      "digest": digest.hexdigest()}))
""")


def _run_step_script(env_extra):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-c", _STEP_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shared_pool_gives_the_bits_of_openblas_threads():
    """Two real processes, 2 threads each: OpenBLAS's own threads and serial kernels, then one
    pool with every kernel split; three training steps (forward, backward, Adam) and a GEMM."""
    own = _run_step_script({"DTRAIN_BLAS_POOL": "openblas"})
    shared = _run_step_script({"DTRAIN_BLAS_POOL": ""})
    assert not own["shared"] and "DTRAIN_BLAS_POOL=openblas" in own["status"]
    assert shared["shared"], shared["status"]
    assert "one pool" in shared["status"]
    assert shared["digest"] == own["digest"]


def test_more_blas_jobs_than_pool_threads_run_on_python_threads():
    """OpenBLAS told to use more threads than Numba has (threadpoolctl behind dtrain's back):
    the callback hands the jobs to Python threads instead of running two on one thread,
    which would never finish (the jobs of one GEMM wait for each other)."""
    script = textwrap.dedent("""
        import numpy as np, numba
        from threadpoolctl import threadpool_limits
        from dtrain.kernels import pool, set_num_threads
        set_num_threads(2)
        assert pool.shared(), pool.status()
        rng = np.random.default_rng(1)
        a = rng.standard_normal((400, 300)).astype(np.float32)
        expect = a @ a.T
        numba.set_num_threads(1)
        with threadpool_limits(2):
            got = a @ a.T
        assert np.array_equal(got, expect)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, DTRAIN_BLAS_POOL=""))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_one_thread_or_opt_out_keeps_openblas_threads():
    script = textwrap.dedent("""
        from dtrain.kernels import pool, set_num_threads
        set_num_threads(1)
        print(pool.shared(), pool.status())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, DTRAIN_BLAS_POOL=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False one thread")


def test_split_kernels_load_from_the_cache():
    """A second process loads the split kernels and the pool's job runner from Numba's cache
    (fixed uuids for what they call) instead of compiling them again."""
    script = textwrap.dedent("""
        import numpy as np
        from dtrain.kernels import pool, set_num_threads
        from dtrain.kernels.cpu import blas, cells, kernels
        set_num_threads(2)
        split = cells
        a = np.ones((8, 16), np.float32)
        ones = lambda k: [np.ones((8, 4), np.float32) for _ in range(k)]
        split.lstm_fwd32_split(2, a, a, np.zeros(16, np.float32), *ones(4),
                               np.ones((3, 4), np.float32), 3, np.zeros(16, np.float32))
        t = kernels._loops()
        t.lstm_bwd_T_split(2, blas.ffi().addresses[np.dtype(np.float32)],
                           np.ones((4, 3), np.float32), a, *ones(3), 3, *ones(2))
        import sys
        sys.path.insert(0, "tests")
        from helpers import random_captions, small_vocab
        from dtrain.nn.model import CaptioningModel
        rng = np.random.default_rng(0)
        model = CaptioningModel(small_vocab(30), 16, 8, 16, "lstm", dtype=np.float32, seed=0)
        # the compiled loops
        model.forward_backward(rng.standard_normal((64, 16)).astype(np.float32),
                               model.pack(random_captions(rng, 64, 8, 30)), 64)
        runner = pool._state["callback"] is not None
        hits = [f.stats.cache_hits.most_common(1)[0][1] if f.stats.cache_hits else 0
                for f in (split.lstm_fwd32_split, t.lstm_bwd_T_split, t.lstm_forward_loop_split,
                          t.lstm_backward_loop_split)]
        print(min(hits), runner)
    """)
    runs = [subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, DTRAIN_BLAS_POOL=""))
            for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    hits, runner = runs[1].stdout.split()
    assert int(hits) >= 1 and runner == "True"
    digest = hashlib.sha256(runs[1].stdout.encode()).hexdigest()
    assert digest  # the second run printed


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_prev_h_rows_match_layers(parts):
    from dtrain.nn import layers

    rng = np.random.default_rng(parts)
    batch_sizes = [9, 9, 7, 4, 4, 1]
    offsets = layers.packed_offsets(batch_sizes)
    Hp = rng.standard_normal((offsets[-1], 11)).astype(np.float32)
    h0 = rng.standard_normal((12, 11)).astype(np.float32)
    expect = layers.prev_h_packed(Hp, h0, batch_sizes, offsets, np.empty_like(Hp))
    got = np.full_like(Hp, np.nan)
    _split().prev_h_rows(parts, Hp, h0, np.array(offsets), got)
    assert np.array_equal(got, expect)
    got2 = CpuKernels(np.float32).prev_h_rows(Hp, h0, offsets, np.full_like(Hp, np.nan))
    assert np.array_equal(got2, expect)


def test_workspace_views_are_reused_and_follow_a_grown_buffer():
    from dtrain.nn.layers import Workspace

    ws = Workspace()
    a = ws.get("x", (3, 4), np.float32)
    assert ws.get("x", (3, 4), np.float32) is a
    a[...] = 1
    assert ws.get("x", (3, 4), np.float32, zero=True).sum() == 0
    big = ws.get("x", (10, 10), np.float32)  # grows: the old views must not be handed out again
    small = ws.get("x", (3, 4), np.float32)
    assert small is not a and np.shares_memory(small, big)
    assert ws.get("x", [3, 4], np.float32).shape == (3, 4)  # a list shape still works
    # zeros(): filled when its buffer is new, then handed out as it is (its users only read it)
    z = ws.zeros("z", (4, 5), np.float32)
    assert z.sum() == 0 and z.shape == (4, 5)
    z[...] = 7  # behind its back: not filled again while the buffer is the same
    assert ws.zeros("z", (2, 5), np.float32).sum() == 70
    grown = ws.zeros("z", (9, 9), np.float32)  # a new buffer: filled
    assert grown.sum() == 0 and ws.zeros("z", (4, 5), np.float32).sum() == 0


def test_oversubscribed_ranks_keep_openblas_threads(monkeypatch):
    """Numba's OpenMP threads spin without yielding: with more threads than cores the pool is
    refused (an unbound rank counts its neighbours; a rank bound to its own cores does not)."""
    from dtrain import cores
    from dtrain.kernels import pool

    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert pool._oversubscribed(2, 2) is None
    assert pool._oversubscribed(2, 3) == 4
    assert pool._oversubscribed(5, 1) == 4
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {2, 3})  # bound by the launcher
    assert pool._oversubscribed(2, 8) is None
    assert pool._oversubscribed(3, 1) == 2
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert not pool.install(2, 3)
    assert "oversubscribed" in pool.status() and not pool.shared()


def test_forked_child_goes_back_to_openblas_threads():
    """multiprocessing's fork: Numba terminates a forked child that starts its GNU OpenMP threads,
    so the child of a process with the pool must run its GEMMs on OpenBLAS's own threads (and
    refuse the pool if asked again)."""
    script = textwrap.dedent("""
        import multiprocessing as mp
        import numpy as np
        from dtrain.kernels import pool, set_num_threads
        from dtrain.kernels.cpu import CpuKernels
        set_num_threads(2)
        assert pool.shared(), pool.status()
        a = np.random.default_rng(0).standard_normal((500, 400)).astype(np.float32)
        expect = a @ a.T
        g = np.ones(70000, np.float32)
        def child(q):
            set_num_threads(2)
            ok = bool(((a @ a.T) == expect).all()) and CpuKernels(np.float32).all_finite(g)
            q.put((ok, pool.shared(), pool.status()))
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(60)
        assert p.exitcode == 0, p.exitcode
        ok, shared, status = q.get(timeout=10)
        assert ok and not shared and "forked child" in status, (ok, shared, status)
        assert pool.shared() and ((a @ a.T) == expect).all()  # the parent keeps its pool
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, DTRAIN_BLAS_POOL=""))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout + proc.stderr[-3000:])


def test_gemm_recorder_hears_every_recurrent_gemm_and_changes_no_bit():
    # the compiled loops tell the kernel set's GEMM recorder of each recurrent GEMM (kind,
    # operand layouts, seconds); the step computes the same bits with and without one
    from dtrain.nn import layers
    from dtrain.nn.cells import lstm

    k = CpuKernels(np.float32)
    if not k.capabilities.compiled_loops:
        pytest.skip("no OpenBLAS sgemm found: the compiled loops are not offered")
    batch_sizes, W, H = [140, 131, 40, 2], 10, 16
    args, dH = _lstm_inputs(np.random.default_rng(5), batch_sizes, W, H)
    heard, outs = [], []
    for recorder in (None, lambda *call: heard.append(call)):
        k.gemm.recorder = recorder
        ws = layers.Workspace()
        _, cache = lstm.lstm_packed_forward(*args, batch_sizes, ws, k)
        grads = lstm.lstm_packed_backward(dH, cache, ws, k)
        outs.append([np.array(x, copy=True) for x in (cache[7], *grads)])
        if recorder is None:
            assert heard == []
    for x, y in zip(*outs):
        assert np.array_equal(x, y)
    T = len(batch_sizes)
    # the input projection, then the loops' GEMMs, then the weight and input gradients
    kinds = ["matmul"] + ["accumulate"] * T + ["transposed"] * T + ["matmul"] * 3
    assert [call[0] for call in heard] == kinds
    heard = heard[1 : 1 + 2 * T]
    Wh = args[3]
    for (kind, a, b, out, seconds), n in zip(heard, batch_sizes + batch_sizes[::-1]):
        assert seconds >= 0 and a[3] == b[3] == out[3] == np.dtype(np.float32).str
        if kind == "accumulate":  # prev_h (n, H) @ Wh into the step's gate rows
            assert (a[1], b[1], out[1]) == ((n, H), Wh.shape, (n, 4 * H)) and b[0] == Wh.ctypes.data
        elif n <= layers.TRANSPOSED_BACKWARD_ROWS:  # Wh d^T, left transposed
            assert (a[1], b[1], out[1]) == (Wh.shape, (n, 4 * H), (H, n))
        else:  # d Wh^T into dh_rec's rows
            assert (a[1], b[1], out[1]) == ((n, 4 * H), Wh.shape, (n, H))
    k.gemm.recorder = None
