"""The Communicator on CuPy arrays (staged through pinned host memory, or
passed directly when the MPI library is CUDA-aware); rank 0 prints OK.

Run as `mpiexec -n P python cupy_suite.py` on a machine with a GPU.
"""

import cupy as cp
import numpy as np

from dtrain.nn.model import StepGrads
from dtrain.parallel.comm import Communicator, DivergenceError, run_guarded
from dtrain.parallel.reducer import AutoReducer, DenseReducer, SparseEmbeddingReducer


def main(comm):
    cp.cuda.Device(comm.local_rank % cp.cuda.runtime.getDeviceCount()).use()
    p, r = comm.size, comm.rank

    a = cp.arange(10, dtype=cp.float32) * (r + 1)
    comm.bcast_array_(a)
    assert cp.array_equal(a, cp.arange(10, dtype=cp.float32))

    for dtype in (np.float32, np.float64):
        for buckets in (1, 3):
            host = [
                np.random.default_rng(q).standard_normal(100_003).astype(dtype) for q in range(p)
            ]
            buf = cp.asarray(host[r])
            ptr = buf.data.ptr
            comm.allreduce_sum_(buf, buckets=buckets)
            assert buf.data.ptr == ptr
            ref = np.sum([h.astype(np.float64) for h in host], axis=0)
            np.testing.assert_allclose(cp.asnumpy(buf), ref, rtol=1e-5, atol=1e-5)
            comm.check_consistent(buf)  # bitwise identical on every rank

    V, W = 40, 6
    ref = np.zeros((V, W))
    for q in range(p):
        rq = np.random.default_rng(50 + q)
        iq = np.sort(rq.choice(V, size=5, replace=False))
        ref[iq] += rq.standard_normal((5, W)).astype(np.float32)
    rr = np.random.default_rng(50 + r)
    ids = cp.asarray(np.sort(rr.choice(V, size=5, replace=False)).astype(np.int64))
    rows = cp.asarray(rr.standard_normal((5, W)).astype(np.float32))
    for cls in (DenseReducer, SparseEmbeddingReducer, AutoReducer):
        flat = cp.zeros(V * W + 3, cp.float32)
        grads = StepGrads(loss=0.0, tokens=1, grad_buffer=flat, embed_offset=3, embed_shape=(V, W),
                          embed_ids=ids, embed_rows=rows, embed_dense=False)
        red = cls(comm).reduce(grads, 0.0, 1, False)
        assert red.tokens == p
        np.testing.assert_allclose(cp.asnumpy(grads.embed_grad), ref, rtol=1e-5, atol=1e-5)
        comm.check_consistent(flat)

    if p > 1:
        x = cp.ones(7, cp.float32)
        if r == p - 1:
            x[3] = 2
        try:
            comm.check_consistent(x)
        except DivergenceError:
            pass
        else:
            raise AssertionError("divergence not detected")
    comm.barrier()
    if comm.is_root:
        print(f"OK cupy size={p} cuda_aware={comm.cuda_aware}", flush=True)


if __name__ == "__main__":
    comm = Communicator()
    run_guarded(comm, main, comm)
