"""--debug collective agreement: one rank makes another collective call than the rest.

Usage: mismatch_worker.py BAD_RANK KIND   KIND: op (a barrier instead of an Allgather) |
count (an Allreduce of another length). Every rank must raise CollectiveMismatchError
naming BAD_RANK and both calls; run_guarded then ends the job.
"""

import sys

import numpy as np

from dtrain.parallel.comm import Communicator, run_guarded


def main(comm, bad, kind):
    comm.debug_collectives = True
    buf = np.ones(8)
    comm.allreduce_sum_(buf)  # the same call everywhere: passes the check
    assert buf[0] == comm.size
    if kind == "op":
        if comm.rank == bad:
            comm.barrier()
        else:
            comm.allgather_scalars([1.0, 2.0])
    else:
        comm.allreduce_sum_(np.ones(5 if comm.rank == bad else 8))
    print("UNREACHABLE: mismatched collectives went through", flush=True)


if __name__ == "__main__":
    comm = Communicator()
    run_guarded(comm, main, comm, int(sys.argv[1]), sys.argv[2])
