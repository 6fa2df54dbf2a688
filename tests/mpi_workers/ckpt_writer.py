"""Save a small checkpoint (step 1), then a large one (step 2) to be killed mid-write.

Usage: ckpt_writer.py DIRECTORY MEGABYTES
Prints "saved 1" after step 1 is complete and "writing 2" just before step 2.
"""

import sys

import numpy as np

from dtrain.checkpoint import checkpoint_path, save_checkpoint


def small_state():
    return {
        "step": 1,
        "params": {"W": np.arange(12, dtype=np.float32).reshape(3, 4)},
        "config": {"note": "previous"},
    }


def main():
    directory, mb = sys.argv[1], float(sys.argv[2])
    save_checkpoint(checkpoint_path(directory, 1), small_state())
    print("saved 1", flush=True)
    n = int(mb * 1e6) // 4 // 16
    big = {f"p{i:02d}": np.full(n, i, dtype=np.float32) for i in range(16)}
    print("writing 2", flush=True)
    save_checkpoint(checkpoint_path(directory, 2), {"step": 2, "params": big})
    print("saved 2", flush=True)


if __name__ == "__main__":
    main()
