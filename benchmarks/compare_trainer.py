"""dtrain's bench against ``dtrain train`` itself: the bench's step must be the trainer's.

    python -m benchmarks.compare_trainer --data DIR [--rounds 6 --steps 20 --ranks P]

Alternating a new process each (or an mpiexec job with --ranks), it times
``dtrain bench`` and runs ``dtrain train`` with the same model, batch, data and
seed, whose logged ms/step (metrics.jsonl, intervals of LOG_EVERY steps, the
first left out as warm-up) the bench's step time must match. It prints both
medians of round medians and their ratio, with and without the batch assembly
(the trainer's logged time leaves it out).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from dtrain.bench.batches import synthetic_mode
from dtrain.bench.relaunch import launch
from dtrain.bench.report import print_dtrain_line, print_header

from .harness import (
    Failed,
    alternate,
    bench_child,
    check_common,
    comparison_parser,
    run_child,
    usage_error,
    write_json,
)
from .rounds import isolation_line, merge_rounds, print_rounds, ratio_range

MODULE = "compare_trainer"
LOG_EVERY = 5


def trainer_argv(args, ckpt, threads=None):
    """``dtrain train`` with the bench's model, batch, data and seed, logging every LOG_EVERY."""
    steps = LOG_EVERY * (1 + -(-args.steps // LOG_EVERY))
    argv = ["train", "--batch-size", args.batch_size, "--wordvec-dim", args.wordvec_dim,
            "--hidden-dim", args.hidden_dim, "--cell", args.cell, "--dtype", args.dtype,
            "--seed", args.seed, "--steps", steps, "--log-every", LOG_EVERY, "--eval-images", 0,
            "--eval-captions", 0, "--checkpoint-dir", ckpt, "--keep-checkpoints", 1,
            "--embed-reduce", args.embed_reduce, "--quiet"]
    for flag, value in (("--data", args.data), ("--micro-batch", args.micro_batch),
                        ("--threads-per-rank", threads)):
        if value is not None:
            argv += [flag, value]
    if args.deterministic:
        argv.append("--deterministic")
    if args.device != "cpu":
        argv += ["--device", args.device]
    if args.precision != "fp32":  # the bench's child gets it through child_argv; so must train
        argv += ["--precision", args.precision]
    return [str(a) for a in argv]


def trainer_child(args, tmp, ranks=None, threads=None):
    """``dtrain train`` run to its end; its logged ms/step (metrics.jsonl)."""
    ckpt = Path(tmp) / "trainer"
    _, share = run_child(launch(ranks, trainer_argv(args, ckpt, threads)), "dtrain train")
    rows = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    train = [r for r in rows if r.get("kind") == "train"][1:]  # the first interval: warm-up
    shutil.rmtree(ckpt, ignore_errors=True)
    med = statistics.median
    return {"framework": "trainer", "median_ms": med(r["step_ms"] for r in train),
            "interval_ms": [r["step_ms"] for r in train],
            "tokens_per_s": med(r["tokens_per_s"] for r in train),
            "tokens_per_step": med(r["tokens_per_s"] * r["step_ms"] / 1e3 for r in train),
            "log_every": LOG_EVERY, "comm_share": med(r["comm_share"] for r in train),
            "foreign_load": share}


def report(args, results):
    merged = merge_rounds(results)
    b, t = merged["bench"], merged["trainer"]
    print_header(b, "benchmarks.compare_trainer")
    print(f"  trainer: `dtrain train` with the same model, batch, data and seed; its ms/step "
          f"from metrics.jsonl (intervals of {LOG_EVERY} steps, the first left out)")
    isolation_line(args, ["bench", "trainer"])
    print_rounds(["bench", "trainer"], results, ("trainer", "bench"), "trainer / bench")
    print_dtrain_line(b, "bench  ")
    print(f"  trainer: {t['median_ms']:8.1f} ms/step  {t['tokens_per_s']:9,.0f} tokens/s (logged)")
    lo, hi = ratio_range(results, "bench", "trainer")
    print(f"  trainer / bench ms/step: {t['median_ms'] / b['median_ms']:.3f} (rounds {lo:.3f} "
          f"to {hi:.3f}); trainer / bench step without batch assembly: "
          f"{t['median_ms'] / b['step_only_ms']:.3f}")
    return {"bench": b, "trainer": t, "rounds": args.rounds,
            "trainer_over_bench": t["median_ms"] / b["median_ms"],
            "trainer_over_bench_step_only": t["median_ms"] / b["step_only_ms"]}


def main(argv=None):
    args = comparison_parser(MODULE, __doc__).parse_args(argv)
    problem = check_common(args)
    if problem is None and synthetic_mode(args):
        problem = "the trainer needs data: leave out --synthetic, -T, -D and -V"
    if problem:
        return usage_error(MODULE, problem)
    ranks = args.ranks if args.ranks and args.ranks > 1 else None
    runs = [("bench", lambda tmp: bench_child(args, tmp, ranks, args.threads, ["--no-floor"])),
            ("trainer", lambda tmp: trainer_child(args, tmp, ranks, args.threads))]
    try:
        results = alternate(args, runs)
    except Failed as exc:
        return exc.code
    write_json(args, report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
