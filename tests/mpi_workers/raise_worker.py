"""One rank raises while the others wait in a collective; the job must end.

Usage: raise_worker.py BAD_RANK [where]   where: allreduce (default) | barrier
"""

import sys
import time

import numpy as np

from dtrain.parallel.comm import Communicator, run_guarded


def main(comm, bad, where):
    buf = np.ones(1000, np.float32)
    comm.allreduce_sum_(buf)  # everyone gets this far
    if comm.rank == bad:
        time.sleep(0.5)  # let the others block in the next collective first
        raise ValueError(f"deliberate failure on rank {comm.rank}")
    for _ in range(3):
        if where == "barrier":
            comm.barrier()
        else:
            comm.allreduce_sum_(buf)
    print("UNREACHABLE: a collective completed without the failed rank", flush=True)


if __name__ == "__main__":
    comm = Communicator()
    bad = int(sys.argv[1])
    where = sys.argv[2] if len(sys.argv) > 2 else "allreduce"
    run_guarded(comm, main, comm, bad, where)
