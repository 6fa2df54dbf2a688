"""bf16 operand rounding fused into the kernels that write the operands (issue 24).

The LSTM step kernels (hidden states, gate gradients), the softmax (dscores) and the row
gather (embedded words, scored rows) write each row's bf16 rounding beside its float32
result, into twins the bf16 Gemm reads (dtrain/kernels/cpu/rounding.py, gemm_bf16.py).
Fused and unfused steps must give the same bits; every twin read is checked against a fresh
rounding here; and the GEMMs must really stop rounding those operands themselves.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from dtrain.kernels import bf16

OK, WHY = bf16.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"bf16 GEMMs cannot run here: {WHY}")

CHILD = """
import sys
import numpy as np
from dtrain import kernels
from dtrain.kernels import pool
from dtrain.kernels.cpu import gemm_bf16
from dtrain.nn.model import CaptioningModel
import test_precision as tp

kernels.set_num_threads(int(sys.argv[1]))
rounded = []  # elements the GEMMs rounded themselves, per pass (not the weights)
plain_round = gemm_bf16.Bf16Gemm.round_into

def counting_round(self, src, bits):
    if self._depth >= 1:  # inside the pass: not the weights (rounded as the pass opens)
        rounded.append(src.size)
    return plain_round(self, src, bits)

def run(fusing, cell, score_all):
    gemm_bf16.fusing = fusing
    gemm_bf16.verify_twins = fusing
    m = CaptioningModel(tp.vocab(300), input_dim=64, wordvec_dim=64, hidden_dim=128, seed=0,
                        precision="bf16", cell_type=cell)
    feats, caps = tp.batch(np.random.default_rng(5), n=96, t=9, d=64, v=300)
    if not score_all:
        caps[::3, 3] = 0  # a NULL inside some captions: only the real targets are scored
    gemm_bf16.Bf16Gemm.round_into = counting_round
    rounded.clear()
    loss, grads = m.loss(feats, caps)
    gemm_bf16.Bf16Gemm.round_into = plain_round
    assert m.gemm._twins == {} and m.gemm._depth == 0
    return loss, grads, sum(rounded)

for cell in ("lstm", "gru", "rnn"):
    for score_all in (True, False):
        loss_f, fused, n_fused = run(True, cell, score_all)
        loss_u, unfused, n_unfused = run(False, cell, score_all)
        same = loss_f == loss_u and all(np.array_equal(fused[k], unfused[k]) for k in fused)
        print(cell, score_all, pool.threads(), same, n_fused, n_unfused)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_rounding_gives_the_unfused_bits_and_rounds_far_less(threads):
    """One bf16 training pass with the rounding fused into the kernels (every twin read
    checked against a fresh rounding) and one without: the same loss and gradients, bit for
    bit, on one thread and split across two (the kernels' split forms), for every cell; the
    GEMMs themselves round less than a tenth (the RNN: a fifth) of what they round unfused
    (what is left: h0, dh0, and for the GRU and RNN the stacked prev_h of dWh)."""
    p = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True,
                       text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.split("\n") if line]
    assert len(rows) == 6, p.stdout
    for cell, _, used, same, n_fused, n_unfused in rows:
        assert used == str(threads) and same == "True", p.stdout
        # left to the GEMMs: h0, dh0 and (GRU, RNN) the stacked prev_h
        assert int(n_fused) * (5 if cell == "rnn" else 10) < int(n_unfused), p.stdout


def test_a_stale_twin_is_caught_and_twins_end_with_their_block(monkeypatch):
    """The checks above can fail: a twin whose float32 buffer changed after its producer
    wrote it is reported at the GEMM that reads it; outside an operands_fixed block no twin
    is handed out, and a block's twins are forgotten when it ends."""
    from dtrain.kernels.cpu import gemm_bf16

    monkeypatch.setattr(gemm_bf16, "verify_twins", True)
    g, rng = gemm_bf16.Bf16Gemm(), np.random.default_rng(0)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    out = np.empty((4, 16), np.float32)
    assert g.twin(x, "x") is None  # no block open
    with g.operands_fixed(w):
        bits = g.twin(x, "x")
        g.round_into(x, bits)  # what the producing kernel does
        g.matmul(x[2:6], w, out)  # a row block of x: read from the twin
        ref = np.empty_like(out)
        gemm_bf16.Bf16Gemm().matmul(x[2:6], w, ref)
        assert np.array_equal(out, ref)
        x[3, 5] += 1.0  # written behind the twin's back
        with pytest.raises(AssertionError, match="twin 'x' is stale"):
            g.matmul(x[2:6], w, out)
        with pytest.raises(AssertionError, match="stale"):
            g.matmul(x[:4].T, out, np.empty((32, 16), np.float32))  # a transposed view
    assert g._twins == {}
    g.matmul(x[2:6], w, out)  # rounded afresh now: the changed element counts
    expected = np.empty_like(out)
    gemm_bf16.Bf16Gemm().matmul(x[2:6].copy(), w, expected)
    assert np.array_equal(out, expected)


def test_the_bf16_floor_replays_operands_converted_before_the_timing(monkeypatch):
    """The GEMM floor of a bf16 step is its GEMMs' own time: the replay converts every operand
    once, before timing, as the step's kernels hand theirs over already converted (twins,
    weights once per pass); without that the floor would time a rounding per GEMM."""
    from dtrain.bench import floor
    from dtrain.kernels.cpu.gemm_bf16 import Bf16Gemm

    g, rng = Bf16Gemm(), np.random.default_rng(1)
    a = rng.standard_normal((64, 48)).astype(np.float32)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    h = rng.standard_normal((64, 32)).astype(np.float32)
    out, acc, back = (np.empty((64, 32), np.float32), np.zeros((64, 48), np.float32),
                      np.empty((48, 64), np.float32))
    gemms = (floor._layouts(a, w, out, "matmul") + floor._layouts(h, w.T, acc, "accumulate")
             + floor._layouts(w, h, back, "transposed"))
    kinds = {"matmul": g.matmul, "accumulate": g.accumulate, "transposed": g.transposed}
    rounded = []
    plain = Bf16Gemm.round_into
    monkeypatch.setattr(Bf16Gemm, "round_into",
                        lambda self, src, bits: rounded.append(src.shape) or plain(self, src, bits))
    assert floor.replay_gemms(gemms, repeats=3, kernel_gemms=kinds,
                              operands_fixed=g.operands_fixed) > 0
    assert len(rounded) == 6  # each GEMM's two operands, once, not once per replay
    rounded.clear()
    floor.replay_gemms(gemms, repeats=3, kernel_gemms=kinds)
    assert len(rounded) == 6 * 4  # the warm pass and 3 timed ones, every operand every time


# -- the weights: rounded by Adam's pass over them, read by the next step's GEMMs -------------


def _bf16_step(micro_batch=None):
    from test_precision import vocab

    from dtrain.nn.model import CaptioningModel
    from dtrain.nn.optim import Adam
    from dtrain.parallel.accumulate import FloatAccumulator
    from dtrain.parallel.reducer import LocalReducer
    from dtrain.step import TrainStep

    model = CaptioningModel(vocab(60), input_dim=24, wordvec_dim=16, hidden_dim=32, seed=0,
                            precision="bf16")
    adam = Adam(model.num_params, dtype=np.float32, kernels=model.kernels)
    step = TrainStep(model, adam, FloatAccumulator(LocalReducer(None)), micro_batch=micro_batch)
    return model, step


def _steps(micro_batch, n=4):
    from test_precision import batch

    model, step = _bf16_step(micro_batch)
    for k in range(n):
        feats, caps = batch(np.random.default_rng(10 + k), n=8, t=7, d=24, v=60)
        step(feats, caps, 8, 1e-2)
    return model, step


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_adam_rounds_the_weights_for_the_next_step_with_the_same_bits(monkeypatch, micro_batch):
    """Adam writes the updated parameters' bf16 rounding in its own pass; the next step's
    GEMMs read the weights from there (every read checked against a fresh rounding): four
    steps give the parameters of four steps whose GEMMs round the weights themselves, bit for
    bit. The weights are rounded by the GEMM side once, in the first step, however many
    micro-shards a step has (the step opens one block around its passes)."""
    from dtrain.kernels.cpu import gemm_bf16

    monkeypatch.setattr(gemm_bf16, "verify_twins", True)
    weight_roundings = []
    plain = gemm_bf16.Bf16Gemm.round_into
    monkeypatch.setattr(gemm_bf16.Bf16Gemm, "round_into", lambda self, src, bits: (
        weight_roundings.append(src.shape) if self._depth == 0 else None,
        plain(self, src, bits))[1])
    fused, step = _steps(micro_batch)
    assert step._weight_bits is not None and step._weight_bits_current
    assert len(weight_roundings) == 4  # W_proj, Wx, Wh, W_vocab, in step 1 only
    monkeypatch.setattr(gemm_bf16, "fusing", False)
    unfused, other = _steps(micro_batch)
    assert other._weight_bits is None
    assert np.array_equal(fused.param_buffer, unfused.param_buffer)
    assert np.array_equal(step._weight_bits, gemm_bf16.bf16.to_bf16(fused.param_buffer))


def test_parameters_written_behind_the_optimizers_back_are_caught():
    """The step trusts Adam's rounding only after its own update; a spot check catches
    parameters changed between two steps by something else (here: all of them)."""
    from test_precision import batch

    model, step = _steps(None, n=2)
    model.param_buffer *= 1.5
    feats, caps = batch(np.random.default_rng(0), n=8, t=7, d=24, v=60)
    with pytest.raises(RuntimeError, match="bf16 copy is stale"):
        step(feats, caps, 8, 1e-2)


def test_the_step_kernels_write_twin_rows_of_their_own_results():
    """The LSTM step kernels with bits: the float32 results are those without, and the bits
    are their rounding (forward with the recurrent product added (r=None) or apart (r), both
    with the next step's prev_h rows; backward with dh_rec given transposed or not); float64
    asks for no bits and is refused."""
    from dtrain.kernels.bf16 import to_bf16
    from dtrain.kernels.cpu import CpuKernels

    k, rng = CpuKernels(np.float32), np.random.default_rng(3)
    n, H, k_next = 6, 8, 4

    def arrays():
        r = np.random.default_rng(9)
        return {"a": r.standard_normal((n, 4 * H)).astype(np.float32),
                "r": r.standard_normal((n, 4 * H)).astype(np.float32),
                "pc": r.standard_normal((n, H)).astype(np.float32),
                "b": r.standard_normal(4 * H).astype(np.float32)}

    for with_r in (False, True):
        outs = []
        for fused in (False, True):
            x = arrays()
            c, tc, h = (np.empty((n, H), np.float32) for _ in range(3))
            h_next = np.empty((k_next, H), np.float32)
            bits = (np.empty((n, H), np.uint16), np.empty((k_next, H), np.uint16))
            k.lstm_step_forward(x["a"], x["r"] if with_r else None, x["pc"], c, tc, h, x["b"],
                                h_next=h_next, bits=bits if fused else None)
            outs.append((x["a"], c, tc, h, h_next, bits))
        (*plain, _), (*fused, bits) = outs
        assert all(np.array_equal(p, f) for p, f in zip(plain, fused))
        assert np.array_equal(bits[0], to_bf16(fused[3]))
        assert np.array_equal(bits[1], to_bf16(fused[4]))
    for transposed in (False, True):
        outs = []
        for fused in (False, True):
            x = arrays()
            dh_up = np.random.default_rng(5).standard_normal((n, H)).astype(np.float32)
            dh_rec = np.random.default_rng(6).standard_normal((n, H)).astype(np.float32)
            dh_T = np.ascontiguousarray(dh_rec[:k_next].T) if transposed else None
            dc_rec = np.random.default_rng(7).standard_normal((n, H)).astype(np.float32)
            bits = np.empty((n, 4 * H), np.uint16)
            extra = {"bits": bits} if fused else {}
            k.lstm_step_backward(x["a"], dh_up, dh_rec, dc_rec, k_next, x["a"], x["pc"],
                                 rng.standard_normal((n, H)).astype(np.float32) * 0 + 0.5,
                                 dh_rec_T=dh_T, **extra)
            outs.append((x["a"], dh_rec, dc_rec, bits))
        assert all(np.array_equal(p, f) for p, f in zip(outs[0][:3], outs[1][:3]))
        assert np.array_equal(outs[1][3], to_bf16(outs[1][0]))
    k64 = CpuKernels(np.float64)
    a = np.zeros((2, 4 * H))
    with pytest.raises(ValueError, match="need float32"):
        k64.lstm_step_forward(a, a, a[:, :H], a[:, :H], a[:, :H], a[:, :H], a[0],
                              bits=(np.empty((2, H), np.uint16), None))


def test_the_softmax_and_the_gather_write_twin_rows_of_their_own_results():
    """The softmax (rows split into blocks of PARTIAL_ROWS, a partial block at the end) and
    the row gather with bits: the float32 results are those without, the bits their rounding."""
    from dtrain.kernels.bf16 import to_bf16
    from dtrain.kernels.cpu import CpuKernels

    k, rng = CpuKernels(np.float32), np.random.default_rng(4)
    scores = rng.standard_normal((150, 37)).astype(np.float32)
    targets, b = rng.integers(0, 37, 150), rng.standard_normal(37).astype(np.float32)
    plain, fused = scores.copy(), scores.copy()
    db_plain, db_fused = np.empty(37, np.float32), np.empty(37, np.float32)
    bits = np.empty(scores.shape, np.uint16)
    loss = k.softmax_cross_entropy(plain, targets, 7.0, bias=b, bias_grad=db_plain)
    assert k.softmax_cross_entropy(fused, targets, 7.0, bias=b, bias_grad=db_fused,
                                   bits=bits) == loss
    assert np.array_equal(plain, fused) and np.array_equal(db_plain, db_fused)
    assert np.array_equal(bits, to_bf16(fused))
    src = rng.standard_normal((40, 24)).astype(np.float32)
    idx = rng.integers(0, 40, 33)
    out, gbits = np.empty((33, 24), np.float32), np.empty((33, 24), np.uint16)
    k.gather_rows(src, idx, out, bits=gbits)
    assert np.array_equal(out, src[idx]) and np.array_equal(gbits, to_bf16(src[idx]))
    with pytest.raises(IndexError):
        k.gather_rows(src, np.array([0, 40]), out[:2], bits=gbits[:2])
    with pytest.raises(ValueError, match="need float32"):
        CpuKernels(np.float64).gather_rows(src.astype(np.float64), idx, out.astype(np.float64),
                                           bits=gbits)


def test_the_rnn_and_gru_step_kernels_write_twin_rows_of_their_own_results():
    from dtrain.kernels.bf16 import to_bf16
    from dtrain.kernels.cpu import CpuKernels

    k, n, H, k_next = CpuKernels(np.float32), 5, 8, 3

    def rand(*shape, seed=0):
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    # RNN forward (a becomes h) and backward
    a1, a2, r = rand(n, H), rand(n, H), rand(n, H, seed=1)
    bits = np.empty((n, H), np.uint16)
    k.rnn_step_forward(a1, r)
    k.rnn_step_forward(a2, r, bits=bits)
    assert np.array_equal(a1, a2) and np.array_equal(bits, to_bf16(a2))
    d1, d2 = np.empty((n, H), np.float32), np.empty((n, H), np.float32)
    k.rnn_step_backward(d1, rand(n, H, seed=2), rand(n, H, seed=3), k_next, a1)
    k.rnn_step_backward(d2, rand(n, H, seed=2), rand(n, H, seed=3), k_next, a1, bits=bits)
    assert np.array_equal(d1, d2) and np.array_equal(bits, to_bf16(d2))
    # GRU forward and backward
    outs = []
    for fused in (False, True):
        a, hn, h = rand(n, 3 * H, seed=4), np.empty((n, H), np.float32), np.empty((n, H),
                                                                                 np.float32)
        hb = np.empty((n, H), np.uint16)
        k.gru_step_forward(a, rand(n, 3 * H, seed=5), rand(n, H, seed=6), hn, h,
                           **({"bits": hb} if fused else {}))
        dax, dah = np.empty((n, 3 * H), np.float32), np.empty((n, 3 * H), np.float32)
        carry = rand(n, H, seed=7)
        db = (np.empty((n, 3 * H), np.uint16), np.empty((n, 3 * H), np.uint16))
        k.gru_step_backward(dax, dah, rand(n, H, seed=8), rand(n, H, seed=9), carry, k_next, a,
                            hn, rand(n, H, seed=6), **({"bits": db} if fused else {}))
        outs.append((a, hn, h, dax, dah, carry, hb, db))
    plain, fused = outs
    assert all(np.array_equal(p, f) for p, f in zip(plain[:6], fused[:6]))
    assert np.array_equal(fused[6], to_bf16(fused[2]))
    assert np.array_equal(fused[7][0], to_bf16(fused[3]))
    assert np.array_equal(fused[7][1], to_bf16(fused[4]))
    with pytest.raises(ValueError, match="need float32"):
        CpuKernels(np.float64).rnn_step_forward(a1.astype(np.float64), r, bits=bits)
