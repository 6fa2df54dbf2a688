"""The same global batch on one rank against P ranks, on the same cores.

    python -m benchmarks.strong_scaling --ranks 2 [--threads C --rounds 6 --steps 20]

Alternating a new process each, it times ``dtrain bench`` on 1 rank x C threads
(C: --threads, default all usable cores) and under mpiexec on P ranks x C/P
threads, at the same --batch-size, and prints both medians of round medians,
the speed-up and the communication time of the P-rank step.
"""

from __future__ import annotations

import sys

from dtrain.bench.report import print_comm, print_dtrain_line, print_header

from .harness import (
    Failed,
    alternate,
    bench_child,
    check_common,
    comparison_parser,
    usage_error,
    write_json,
)
from .load import cores
from .rounds import isolation_line, merge_rounds, print_rounds

MODULE = "strong_scaling"


def _problem(args, P, C):
    if P is None or P < 2 or C % P:
        return (f"--ranks {P}: expected a number of ranks >= 2 that divides the {C} threads of "
                "one rank (--threads)")
    if args.batch_size % P:
        return f"--batch-size {args.batch_size} is not divisible by --ranks {P}"
    return check_common(args)


def report(args, results, one, many, P, C):
    merged = merge_rounds(results)
    a, b = merged[one], merged[many]
    print_header(a, f"benchmarks.strong_scaling --ranks {P} (global batch {args.batch_size})")
    isolation_line(args, [one, many])
    print_rounds([one, many], results, (one, many), "speed-up")
    print_dtrain_line(a, f"{one:>22}")
    print_dtrain_line(b, f"{many:>22}")
    print_comm(b)
    speedup = a["median_ms"] / b["median_ms"]
    print(f"  {many} / {one}: {speedup:.2f}x the speed at the same global batch")
    return {"one_rank": a, "ranks": b, "P": P, "threads": C, "speedup": speedup,
            "rounds": args.rounds}


def main(argv=None):
    args = comparison_parser(MODULE, __doc__).parse_args(argv)
    P, C = args.ranks, args.threads or cores()
    problem = _problem(args, P, C)
    if problem:
        return usage_error(MODULE, problem)
    one, many = f"1 rank x {C} threads", f"{P} ranks x {C // P} thread(s)"
    runs = [(one, lambda tmp: bench_child(args, tmp, None, C, ["--no-floor"])),
            (many, lambda tmp: bench_child(args, tmp, P, C // P, ["--no-floor"]))]
    try:
        results = alternate(args, runs)
    except Failed as exc:
        return exc.code
    write_json(args, report(args, results, one, many, P, C))
    return 0


if __name__ == "__main__":
    sys.exit(main())
