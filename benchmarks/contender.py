"""One contender of a comparison, in a process of its own, timing blocks of steps on request.

    python -m benchmarks.contender --framework dtrain|torch [--serve] <dtrain bench flags>

With ``--serve`` it warms up, says ``ready`` and then waits on stdin, where the
parent (harness.py) writes ``run K`` (time K steps; the answer is their times
and how much of the machine others used meanwhile) or ``finish`` (the result of
all blocks; dtrain's includes the GEMM floor unless --no-floor). Answers are
single lines ``@@{json}`` on stdout. Between requests the process sleeps in a
blocking read, so its thread pools fall idle: the parent checks that before it
times the other contender. Without ``--serve`` (PyTorch only; dtrain's own
process is then ``python -m dtrain bench``) it warms up, times --steps steps
and writes --json.

The dtrain contender is dtrain's own bench (``dtrain.bench.run_step_bench``):
the trainer's ``TrainStep`` on the trainer's batches. Each contender reports
whether it loaded the other framework (torch in dtrain's process, Numba in
PyTorch's): the isolation, checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from dtrain.commands.bench import add_workload_arguments

from .load import ForeignLoad

TORCH_MISSING = ("PyTorch is not installed; this comparison needs it: "
                 "`pip install torch==2.13.0` (in the test extra)")


def say(obj):
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(warmup, block, finish):
    """The loop: ``warmup()``, then ``run K`` -> ``block(K)``, ``finish`` -> ``finish()``."""
    warmup()
    say({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "run":
            load = ForeignLoad().start()
            times = block(int(words[1]))
            say({"times_ms": [1e3 * t for t in times], "foreign_load": load.share()})
        elif words[0] == "finish":
            say({"result": finish()})
            return 0
    return 1  # the parent went away


def parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.contender",
                                description=__doc__.split("\n\n")[0])
    add_workload_arguments(p)
    p.add_argument("--framework", choices=["dtrain", "torch"], required=True)
    p.add_argument("--serve", action="store_true", help="time blocks of steps on request")
    return p


def _error(msg):
    print(f"benchmarks.contender: error: {msg}", file=sys.stderr)
    return 2


def run_dtrain(args):
    """dtrain's bench, its timer driven block by block (on one CPU process)."""
    from dtrain.bench import run_step_bench
    from dtrain.parallel.comm import Communicator, run_guarded

    def drive(timer, result):  # result() says whether this process imported torch
        return serve(lambda: timer.warmup(args.warmup), timer.block, result)

    comm = Communicator()
    return run_guarded(comm, run_step_bench, args, comm, drive)


def run_torch(args):
    """PyTorch's step on the same batches as dtrain's bench."""
    if importlib.util.find_spec("torch") is None:
        return _error(TORCH_MISSING)
    from dtrain import backend
    from dtrain.bench.batches import open_batches

    from .torch_ref import TorchTimer

    try:
        device = backend.resolve_device(args.device)
    except backend.DeviceError as exc:
        return _error(str(exc))
    threads = backend.node_threads(1, args.threads)
    batches, work = open_batches(args)
    timer = TorchTimer(args, batches, work, threads, "cuda" if device == "gpu" else "cpu")

    def finish():
        # the isolation, checked: this process never loaded dtrain's kernels (Numba)
        return timer.result() | {"pid": os.getpid(), "numba_loaded": "numba" in sys.modules}

    if args.serve:
        return serve(lambda: timer.warmup(args.warmup), timer.block, finish)
    timer.warmup(args.warmup)
    timer.block(args.steps)
    result = finish()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv=None):
    args = parser().parse_args(argv)
    if args.framework == "torch":
        return run_torch(args)
    if not args.serve:
        return _error("--framework dtrain runs with --serve; time dtrain alone with "
                      "`python -m dtrain bench`")
    return run_dtrain(args)


if __name__ == "__main__":
    sys.exit(main())
