"""Median time of allreduce_sum_ on a float32 buffer (not a test).

Usage: mpiexec -n 2 python bench_allreduce.py [MB=10] [repeats=50]
"""

import sys
import time

import numpy as np

from dtrain.parallel.comm import Communicator, run_guarded


def main(comm):
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    buf = np.ones(int(mb * 1e6) // 4, np.float32)
    for _ in range(5):
        comm.allreduce_sum_(buf)
    times = []
    for _ in range(reps):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum_(buf)
        times.append(time.perf_counter() - t0)
    mean_med = comm.allreduce_scalars([np.median(times)])[0] / comm.size
    if comm.is_root:
        med = np.median(times)
        print(
            f"allreduce {buf.nbytes / 1e6:.1f} MB float32 on {comm.size} ranks: "
            f"median {med * 1e3:.2f} ms (mean of rank medians {mean_med * 1e3:.2f} ms), "
            f"p10 {np.percentile(times, 10) * 1e3:.2f} ms, "
            f"p90 {np.percentile(times, 90) * 1e3:.2f} ms, "
            f"algbw {buf.nbytes / med / 1e9:.2f} GB/s"
        )


if __name__ == "__main__":
    comm = Communicator()
    run_guarded(comm, main, comm)
