"""dtrain's training step against the same captioner in PyTorch, each in its own process.

    python -m benchmarks.compare_torch --batch-size 128 [--rounds 6 --steps 20]
    python -m benchmarks.compare_torch --precision bf16 -N 128   # against PyTorch's autocast

The dtrain side is dtrain's own bench (the trainer's TrainStep on the trainer's
batches); the PyTorch side is torch_ref.py on the same batches. On a CPU two
processes kept alive alternate blocks of --steps steps (harness.paired_blocks),
each checked idle while the other runs; --fresh-processes, and the GPU, start a
new process per framework and round instead. It prints each framework's median
of round medians, every round, the ratio of tokens/s, how much of the machine
other processes used, and dtrain's GEMM floor and breakdown. Every
``dtrain bench`` flag applies (-N, --data, --cell, --dtype, --threads, ...).
``--precision bf16`` pits dtrain's bf16 step (bf16 GEMM operands, float32 sums
and master weights) against PyTorch under ``torch.autocast(dtype=bfloat16)``
(forward and loss inside it; backward and Adam outside; float32 weights): each
side's mixed precision as its users would run it. The default, fp32, is float32
on both sides.
PyTorch must be installed (``pip install torch==2.13.0``: it is in the test
extra); nothing here installs it.
"""

from __future__ import annotations

import importlib.util
import sys

from dtrain.bench.report import print_dtrain_line, print_floor, print_header
from dtrain.config import check_precision

from .contender import TORCH_MISSING
from .harness import (
    Failed,
    alternate,
    bench_child,
    check_common,
    comparison_parser,
    paired_blocks,
    torch_child,
    usage_error,
    write_json,
)
from .rounds import isolation_line, merge_rounds, print_rounds, ratio_range, with_rounds

MODULE = "compare_torch"
LABELS = {"dtrain": "dtrain", "PyTorch": "torch"}
# what each side runs at each --precision, in the table and the JSON
PRECISION_NAMES = {"fp32": {"dtrain": "fp32", "PyTorch": "fp32"},
                   "bf16": {"dtrain": "bf16 GEMMs", "PyTorch": "bf16 autocast"}}


def parser():
    p = comparison_parser(MODULE, __doc__)
    p.add_argument("--fresh-processes", action="store_true",
                   help="on a CPU: a new process per framework and round, instead of two "
                        "processes kept alive that alternate blocks of --steps steps")
    return p


def _time_both(args):
    """({label: [result per round]}, {label: merged result}, paired blocks or not)."""
    if args.device == "cpu" and not args.fresh_processes:
        results, finals = paired_blocks(args, LABELS)
        return results, {k: with_rounds(finals[k], results[k]) for k in LABELS}, True
    runs = [("dtrain", lambda tmp: bench_child(args, tmp, threads=args.threads)),
            ("PyTorch", lambda tmp: torch_child(args, tmp, threads=args.threads))]
    results = alternate(args, runs)
    return results, merge_rounds(results), False


def _isolation(args, results, blocks):
    """(processes, frameworks mixed in one process?, most CPU the idle one used) + its line."""
    if blocks:
        others = max(x["others_cpu_ms"] for rs in results.values() for x in rs)
        print(f"  isolation: two processes kept alive, never running at once: blocks of "
              f"{args.steps} steps alternate (dtrain, PyTorch, then PyTorch, dtrain, ...) over "
              f"{args.rounds} rounds after {args.warmup} warm-up steps each; before each block "
              f"both were idle, and during a block the other process used at most "
              f"{others:.1f} ms of CPU; medians of the block medians")
        return 2, others
    isolation_line(args, list(LABELS))
    return len({x["pid"] for rs in results.values() for x in rs}), None


def _torch_precision_line(t):
    """What PyTorch ran in: float32, or autocast and the dtypes it chose (it picks per op)."""
    if t.get("precision", "fp32") == "fp32":
        return f"  PyTorch precision: {t['weights_dtype']} throughout (no autocast)"
    seen = t["autocast_dtypes"]
    return (f"  PyTorch precision: {t['autocast']}; weights, gradients and Adam state "
            f"{seen['grads']}; autocast ran the recurrence in {seen['rnn_output']}, the scores "
            f"in {seen['scores']}, the loss in {seen['loss']}")


def report(args, results, merged, blocks):
    """Print the comparison; the result dict (dtrain's, with PyTorch's and the ratio)."""
    d, t = merged["dtrain"], merged["PyTorch"]
    names = {k: f"{k} {v}" for k, v in PRECISION_NAMES[args.precision].items()}
    print_header(d, "benchmarks.compare_torch")
    print(f"  PyTorch: {t['torch_version']}, CPU capability {t['torch_cpu_capability']}, "
          f"{t['torch_threads']} threads ({t['torch_parallel']}); nn.{d['cell'].upper()}, Adam")
    print(_torch_precision_line(t))
    processes, others = _isolation(args, results, blocks)
    mixed = any(x.get("torch_loaded") for x in [d, *results["dtrain"]]) or \
        any(x.get("numba_loaded") for x in [t, *results["PyTorch"]])
    print(f"  {processes} processes; " + ("a process loaded both frameworks!" if mixed else
          "no dtrain process imported torch, no PyTorch process loaded Numba (dtrain's kernels)"))
    print_rounds(["dtrain", "PyTorch"], results, ("PyTorch", "dtrain"), "PyTorch ms / dtrain ms",
                 names)
    width = max(len(x) for x in names.values())
    print_dtrain_line(d, f"{names['dtrain']:<{width}}")
    print(f"  {names['PyTorch']:<{width}}: {t['median_ms']:8.1f} ms/step  "
          f"{t['tokens_per_s']:9,.0f} tokens/s")
    lo, hi = ratio_range(results, "dtrain", "PyTorch")
    ratio = t["median_ms"] / d["median_ms"]
    best_d, best_t = min(d["round_medians_ms"]), min(t["round_medians_ms"])
    print(f"  {names['dtrain']} / {names['PyTorch']} tokens/s: {ratio:.2f}x (rounds {lo:.2f}x "
          f"to {hi:.2f}x; best rounds {best_d:.1f} ms vs {best_t:.1f} ms: {best_t / best_d:.2f}x)")
    print_floor(d)
    if d["device"] != "cpu":
        from dtrain.bench.gpu import print_gpu_lines

        print_gpu_lines(d)
    return dict(d) | {
        "isolation": "two processes, alternating blocks" if blocks else
        "a new process per framework and round", "rounds": args.rounds,
        "torch_version": t["torch_version"], "torch_median_ms": t["median_ms"],
        "torch_precision": t["precision"], "contenders": names,
        "torch_tokens_per_s": t["tokens_per_s"], "speedup_vs_torch": ratio,
        "speedup_range": [lo, hi], "speedup_best_rounds": best_t / best_d, "torch": t,
        "processes": processes, "frameworks_mixed": mixed, "idle_other_cpu_ms_max": others,
        "round_ms": [{"dtrain": a["median_ms"], "torch": b["median_ms"]}
                     for a, b in zip(results["dtrain"], results["PyTorch"])]}


def _precision_problem(args):
    """One line if --precision cannot run here (dtrain bench's own check: bf16 needs float32,
    the CPU, MKL and AMX-BF16), before any process starts; else None."""
    try:
        check_precision(args.precision, args.dtype, args.device, bool(args.deterministic))
    except ValueError as exc:
        return str(exc)
    if args.precision != "fp32" and args.no_kernels:
        return f"--precision {args.precision}: runs on the fused CPU kernels, not --no-kernels"
    return None


def main(argv=None):
    args = parser().parse_args(argv)
    problem = check_common(args)
    if problem is None and args.ranks and args.ranks > 1:
        problem = "--ranks: this comparison times one process per framework; leave it out"
    if problem is None:
        problem = _precision_problem(args)
    if problem is None and importlib.util.find_spec("torch") is None:
        problem = TORCH_MISSING
    if problem:
        return usage_error(MODULE, problem)
    try:
        results, merged, blocks = _time_both(args)
    except Failed as exc:
        return exc.code
    write_json(args, report(args, results, merged, blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
