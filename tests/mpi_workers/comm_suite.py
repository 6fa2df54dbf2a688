"""Every Communicator collective, checked on each rank; rank 0 prints OK.

Run as `mpiexec -n P python comm_suite.py` or plainly (a world of one).
Any failed check raises inside run_guarded, which aborts the job non-zero.
"""

import numpy as np

from dtrain.nn.model import StepGrads
from dtrain.parallel.comm import Communicator, DivergenceError, run_guarded
from dtrain.parallel.reducer import (
    AutoReducer,
    DenseReducer,
    SparseEmbeddingReducer,
    embedding_bytes,
)


def rank_data(rank, shape, dtype, salt=0):
    rng = np.random.default_rng(1000 * salt + rank)
    return rng.standard_normal(shape).astype(dtype)


def identical_everywhere(comm, arr):
    """Every rank holds exactly these bytes (compare the gathered copies)."""
    every = comm.allgatherv(np.ascontiguousarray(arr).reshape(1, -1))
    for r in range(comm.size):
        assert every[r].tobytes() == every[0].tobytes(), f"rank {r} differs bitwise"


def main():
    comm = Communicator()
    p, r = comm.size, comm.rank
    assert 0 <= comm.local_rank < comm.local_size <= p
    assert comm.is_root == (r == 0)
    assert comm.cuda_aware in (True, False)

    # bcast of arrays (in place) and of JSON-able objects
    a = np.arange(12, dtype=np.float64).reshape(3, 4) * (r + 1)
    assert comm.bcast_array_(a) is a
    assert np.array_equal(a, np.arange(12.0).reshape(3, 4))
    b = np.full(5, r, dtype=np.int64)
    comm.bcast_array_(b, root=p - 1)
    assert (b == p - 1).all()
    obj = comm.bcast_obj({"rank": r, "v": [1, 2.5, "x"]} if r == 0 else None)
    assert obj == {"rank": 0, "v": [1, 2.5, "x"]}

    # fused allreduce, in place, buckets 1 and 3, float32/float64
    for dtype in (np.float32, np.float64):
        for buckets in (1, 3):
            buf = rank_data(r, 1001, dtype, salt=buckets)
            ref = sum(rank_data(q, 1001, dtype, salt=buckets).astype(np.float64) for q in range(p))
            ptr = buf.ctypes.data
            assert comm.allreduce_sum_(buf, buckets=buckets) is None
            assert buf.ctypes.data == ptr and buf.dtype == dtype
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(buf, ref, rtol=tol, atol=tol)
            identical_everywhere(comm, buf)

    # scalars
    s = comm.allreduce_scalars([1.0, r, 0.5])
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, [p, p * (p - 1) / 2, 0.5 * p])

    # allgatherv of uneven rows (rank r sends r+1 rows, rank 1 none when p > 1)
    n = 0 if (r == 1) else r + 1
    rows = np.full((n, 2, 3), r, dtype=np.float32)
    got = comm.allgatherv(rows)
    want = np.concatenate(
        [np.full((0 if q == 1 else q + 1, 2, 3), q, np.float32) for q in range(p)]
    )
    assert got.shape == want.shape and np.array_equal(got, want), (got.shape, want.shape)

    # the gradient reducers: dense, sparse and auto embedding reduce, bitwise identical everywhere
    V, W, prefix = 50, 8, 7
    for touched, expect_auto in ((3, "sparse"), (45, "dense")):
        ref = np.zeros((V, W), np.float64)
        for q in range(p):
            rq = np.random.default_rng(7 + q)
            iq = np.sort(rq.choice(V, size=touched, replace=False))
            ref[iq] += rq.standard_normal((touched, W)).astype(np.float32)
        results = {}
        for cls in (DenseReducer, SparseEmbeddingReducer, AutoReducer):
            rng = np.random.default_rng(7 + r)
            ids = np.sort(rng.choice(V, size=touched, replace=False)).astype(np.int64)
            grad_rows = rng.standard_normal((touched, W)).astype(np.float32)
            # W_embed's block: garbage until reduced
            buf = np.full(prefix + V * W, np.nan, np.float32)
            buf[:prefix] = r + 1
            grads = StepGrads(loss=float(r), tokens=r + 1, grad_buffer=buf, embed_offset=prefix,
                              embed_shape=(V, W), embed_ids=ids, embed_rows=grad_rows,
                              embed_dense=False)
            red = cls(comm).reduce(grads, float(r), r + 1, r == p - 1)
            assert red.loss == p * (p - 1) / 2 and red.tokens == p * (p + 1) / 2 and red.stop, red
            assert (red.bytes > 0) == (p > 1), red
            np.testing.assert_array_equal(buf[:prefix],
                                          np.full(prefix, p * (p + 1) / 2, np.float32))
            np.testing.assert_allclose(grads.embed_grad, ref, rtol=1e-5, atol=1e-5)
            identical_everywhere(comm, buf)
            results[cls.mode] = (red.mode, buf.copy())
        assert results["sparse"][0] == "sparse" and results["dense"][0] == "dense"
        if p > 1:
            assert results["auto"][0] == expect_auto, (touched, results["auto"][0])
            assert np.array_equal(results["auto"][1], results[expect_auto][1])
    bytes_ = embedding_bytes(p, 10, V, W, 4)
    if p > 1:
        assert bytes_["sparse"] < bytes_["dense"]

    # consistency check: equal arrays pass; a perturbed rank is named
    params = np.linspace(0, 1, 333, dtype=np.float32)
    comm.check_consistent(params)
    if p > 1:
        bad = p - 1
        if r == bad:
            params[17] = np.nextafter(params[17], np.float32(2))
        try:
            comm.check_consistent(params, what="params")
        except DivergenceError as exc:
            assert f"[{bad}]" in str(exc) and "params" in str(exc), str(exc)
        else:
            raise AssertionError("perturbed rank not detected")

    comm.barrier()
    if comm.is_root:
        print(f"OK size={p}", flush=True)


if __name__ == "__main__":
    run_guarded(Communicator(), main)
