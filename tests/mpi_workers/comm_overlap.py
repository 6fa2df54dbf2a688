"""The overlapped W_vocab/b_vocab reduction and bf16 transport on a real communicator.

Usage: comm_overlap.py   (under mpiexec -n 2 or -n 3; asserts on every rank, prints OK on rank 0)

1. Reducer level, at the CS231n sizes (H=512, W=256, V=1004, LSTM: 2,352,620 dense floats):
   every rank's gradient is drawn from its rank's seed (magnitudes over 11 decades, so the
   order of a sum shows in its bits). With ``early`` the reduction equals today's (no early
   part) bit for bit, dense and sparse, also when one rank's pass never started it; bf16
   transport stays within BF16_SUM_BOUND * sum_r |g_r| of the exact (float64) sum, differs
   from float32 somewhere, gives every rank the same bits and counts half the dense bytes.
2. Training: build_step with --overlap-reduce equals it without, bit for bit, after 3
   steps; the model's hook started the early part inside every pass.
"""

import threading

import numpy as np

from dtrain.config import TrainConfig
from dtrain.nn.model import PARAM_ORDER, CaptioningModel, StepGrads, param_shapes
from dtrain.parallel.comm import BF16_SUM_BOUND, Communicator, run_guarded
from dtrain.parallel.reducer import make_reducer
from dtrain.step import build_step, vocab_bounds

V, W, H, D = 1004, 256, 512, 512


def layout():
    shapes = param_shapes(V, D, W, H, "lstm")
    segments, start = [], 0
    for name in PARAM_ORDER:
        n = int(np.prod(shapes[name]))
        segments.append((name, start, start + n))
        start += n
    return segments, start


def rank_grads(rank, total, embed_offset):
    """Rank ``rank``'s dense gradient and embedding rows (the same on whichever rank draws them)."""
    rng = np.random.default_rng(100 + rank)
    dense = rng.standard_normal(embed_offset) * 10.0 ** rng.integers(-9, 2, embed_offset)
    ids = np.sort(rng.choice(V, size=200 + 17 * rank, replace=False)).astype(np.int64)
    rows = rng.standard_normal((ids.size, W))
    return dense.astype(np.float32), ids, rows.astype(np.float32)


def reduce_once(comm, embed_reduce, reduce_dtype="fp32", early=None, start_on=()):
    segments, total = layout()
    offset = segments[-1][1]
    dense, ids, rows = rank_grads(comm.rank, total, offset)
    buf = np.zeros(total, np.float32)
    buf[:offset] = dense
    grads = StepGrads(loss=1.0 + comm.rank, tokens=10, grad_buffer=buf, embed_offset=offset,
                      embed_shape=(V, W), embed_ids=ids, embed_rows=rows, embed_dense=False)
    reducer = make_reducer(comm, embed_reduce, 1, reduce_dtype, early)
    if comm.rank in start_on:  # as the model's hook does, before the reduction
        reducer.start_early(buf)
    reduced = reducer.reduce(grads, grads.loss, grads.tokens, False)
    comm.check_consistent(buf, "reduced gradient")
    return buf, reduced, reducer


def check_reducer(comm):
    segments, total = layout()
    early = vocab_bounds(segments)
    everyone = tuple(range(comm.size))
    for mode in ("dense", "sparse"):
        today, r0, _ = reduce_once(comm, mode)
        for start_on in (everyone, everyone[1:]):  # rank 0's pass did not get there: late start
            got, r1, reducer = reduce_once(comm, mode, early=early, start_on=start_on)
            assert np.array_equal(got.view(np.uint32), today.view(np.uint32)), (mode, start_on)
            assert r1.bytes == r0.bytes and r1.mode == r0.mode == mode, (r0, r1)
            assert reducer.early_in_pass == int(comm.rank in start_on) and reducer.pending is None
    # bf16 transport of the dense part, against the exact sum of every rank's gradient
    offset = segments[-1][1]
    exact = np.zeros(offset)
    magnitude = np.zeros(offset)
    for r in range(comm.size):
        g = rank_grads(r, total, offset)[0].astype(np.float64)
        exact += g
        magnitude += np.abs(g)
    fp32, r32, _ = reduce_once(comm, "sparse")
    bf16, r16, _ = reduce_once(comm, "sparse", reduce_dtype="bf16")
    err = np.abs(bf16[:offset].astype(np.float64) - exact)
    assert np.all(err <= BF16_SUM_BOUND * magnitude + 1e-45), float(np.max(err / magnitude))
    assert not np.array_equal(bf16[:offset], fp32[:offset])  # it did travel as bf16
    assert np.array_equal(bf16[offset:], fp32[offset:])  # the embedding rows stay float32
    rel = float(np.max(err / magnitude))
    assert rel > 2.0**-10, rel  # bf16's rounding, not float32's
    ring = 2 * 2 * (comm.size - 1) * offset * 4 // comm.size
    assert abs(r32.bytes - r16.bytes - ring // 2) <= 4, (r32.bytes, r16.bytes, ring)
    return rel


VOCAB = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, **{f"w{i}": i for i in range(4, 40)}}


def train(comm, overlap, steps=3):
    model = CaptioningModel(VOCAB, 12, 8, 16, "lstm", dtype=np.float32, seed=0)
    cfg = TrainConfig(batch_size=8 * comm.size, overlap_reduce=overlap)
    step = build_step(cfg, comm, model)
    rng = np.random.default_rng(7 + comm.rank)
    for _ in range(steps):
        feats = rng.standard_normal((8, 12)).astype(np.float32)
        caps = np.zeros((8, 9), np.int32)
        for n in range(8):
            L = int(rng.integers(2, 8))
            caps[n, 0], caps[n, 1 : L + 1], caps[n, L + 1] = 1, rng.integers(3, 40, L), 2
        step(feats, caps, cfg.batch_size, 1e-2)
    return model.param_buffer.copy(), step


def main(comm):
    rel = check_reducer(comm)
    plain, _ = train(comm, False)
    overlapped, step = train(comm, True)
    reducer = step.accumulator.reducer
    assert reducer.early is not None and reducer.early_in_pass == 3, step.describe()
    assert "during BPTT" in step.describe()
    assert np.array_equal(plain.view(np.uint32), overlapped.view(np.uint32))
    # one progress thread for the process, started at the first overlapped sum and kept
    # (not one per step); it polls nothing once every sum has been waited for
    from dtrain.parallel import pending

    assert [t.name for t in threading.enumerate()].count("dtrain-iallreduce") == 1
    assert pending._PROGRESS._jobs == []
    if comm.rank == 0:
        print(f"bf16 max error / sum|g|: {rel:.3g} (bound {BF16_SUM_BOUND:.3g})", flush=True)
        print("OK", flush=True)


if __name__ == "__main__":
    comm = Communicator()
    raise SystemExit(run_guarded(comm, main, comm) or 0)
