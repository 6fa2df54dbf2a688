"""Comparisons where every contender runs in a process of its own, alternating.

Two frameworks timed in one process share its cores with each other's idle
thread pools (OpenBLAS's pthreads, PyTorch's OpenMP workers keep spinning
after their own work), which slows whichever runs second. So here every
contender has a process of its own, and only one runs at a time:

* ``--compare-torch`` on a CPU keeps two processes alive (``bench --framework
  dtrain|torch --serve``, serve.py) and alternates blocks of ``--steps`` steps
  between them, A B then B A, for ``--rounds`` rounds. Before each block both
  must be idle (their CPU time stopped growing: the last block's thread pools
  sleep), and the CPU time the idle one uses during the other's block is
  recorded and printed: the proof that they never overlap. Short blocks pair
  the two closely in time, so the slow drifts of a shared host hit both alike.
  ``--fresh-processes`` (and the GPU) starts a new process per framework and
  round instead.
* ``--compare-trainer``: the bench against ``dtrain train`` itself, whose
  logged ms/step (metrics.jsonl) the bench's step time must match; a new
  process each, alternating.
* ``--strong-scaling P``: the same global batch on 1 rank x C threads against
  P ranks x C/P threads (C: the threads of one rank, default all cores); a new
  process (or mpiexec) each, alternating.

Each reports the median of every contender's round medians, the rounds
themselves, the ratio, and how much of the machine other processes used.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .load import cores
from .report import (
    merge_rounds,
    print_comm,
    print_dtrain_line,
    print_floor,
    print_header,
    print_rounds,
    ratio_range,
    with_rounds,
)

# Flags of the parent that are not the children's (or that each child gets its own value of).
NOT_FORWARDED = {"command", "func", "compare_torch", "compare_trainer", "strong_scaling", "rounds", "json",
                 "ranks", "threads", "framework", "serve", "fresh_processes"}
TRAINER_LOG_EVERY = 5


def child_flags(args, drop=NOT_FORWARDED):
    """``bench`` flags that reproduce ``args`` (every flag's dest is its long name)."""
    out = []
    for key, value in sorted(vars(args).items()):
        if key in drop or value is None or value is False or callable(value):
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def mpiexec():
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _launch(ranks, argv):
    base = [sys.executable, "-m", "dtrain", *argv]
    return [mpiexec(), "-n", str(ranks), *base] if ranks and ranks > 1 else base


class _Failed(Exception):
    def __init__(self, code):
        self.code = code


def _run_child(cmd, what):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        print(f"dtrain: error: bench: the {what} run failed (exit {proc.returncode}): {' '.join(cmd)}",
              file=sys.stderr)
        raise _Failed(proc.returncode or 1)
    return proc


def _bench_child(args, tmp, framework, ranks=None, threads=None, extra=()):
    out = Path(tmp) / "child.json"
    out.unlink(missing_ok=True)
    argv = ["bench", *child_flags(args), "--framework", framework, "--json", str(out), *extra]
    if threads:
        argv += ["--threads", str(threads)]
    _run_child(_launch(ranks, argv), framework)
    return json.loads(out.read_text())


def _trainer_child(args, tmp, ranks=None, threads=None):
    """``dtrain train`` with the bench's model and batch; its logged ms/step (metrics.jsonl)."""
    ckpt = Path(tmp) / "trainer"
    steps = TRAINER_LOG_EVERY * (1 + -(-args.steps // TRAINER_LOG_EVERY))
    argv = ["train", "--batch-size", args.batch_size, "--wordvec-dim", args.wordvec_dim,
            "--hidden-dim", args.hidden_dim, "--cell", args.cell, "--dtype", args.dtype, "--seed", args.seed,
            "--steps", steps, "--log-every", TRAINER_LOG_EVERY, "--eval-images", 0, "--eval-captions", 0,
            "--checkpoint-dir", ckpt, "--keep-checkpoints", 1, "--embed-reduce", args.embed_reduce, "--quiet"]
    for flag, value in (("--data", args.data), ("--micro-batch", args.micro_batch),
                        ("--threads-per-rank", threads)):
        if value is not None:
            argv += [flag, value]
    if args.deterministic:
        argv.append("--deterministic")
    if args.device != "cpu":
        argv += ["--device", args.device]
    _run_child(_launch(ranks, [str(a) for a in argv]), "trainer")
    rows = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]
    train = [r for r in rows if r.get("kind") == "train"][1:]  # the first interval holds the warm-up
    shutil.rmtree(ckpt, ignore_errors=True)
    t = statistics.median(r["step_ms"] for r in train)
    return {"framework": "trainer", "median_ms": t, "interval_ms": [r["step_ms"] for r in train],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "tokens_per_step": statistics.median(r["tokens_per_s"] * r["step_ms"] / 1e3 for r in train),
            "log_every": TRAINER_LOG_EVERY, "comm_share": statistics.median(r["comm_share"] for r in train)}


def _alternate(args, runs):
    """Run each (label, fn(tmp)) once per round, alternating; {label: [result per round]}."""
    results = {label: [] for label, _ in runs}
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        for k in range(args.rounds):
            for label, fn in runs:
                print(f"  round {k + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
                results[label].append(fn(tmp))
    return results


def run_isolated(args):
    """--compare-torch, --compare-trainer or --strong-scaling (one of them)."""
    from .batches import synthetic_mode

    chosen = [f for f in ("compare_torch", "compare_trainer", "strong_scaling") if getattr(args, f)]
    if len(chosen) > 1:
        return _usage(f"give one of --compare-torch, --compare-trainer, --strong-scaling, not "
                      f"{' and '.join('--' + c.replace('_', '-') for c in chosen)}")
    if args.rounds < 1:
        return _usage(f"--rounds: expected a positive integer, got {args.rounds}")
    if args.compare_torch and args.ranks and args.ranks > 1:
        return _usage("--compare-torch times one process per framework; run it without --ranks")
    if args.compare_trainer and synthetic_mode(args):
        return _usage("--compare-trainer needs the trainer's data (not --synthetic, -T, -D or -V)")
    try:
        if args.compare_torch:
            return _compare_torch(args)
        if args.compare_trainer:
            return _compare_trainer(args)
        return _strong_scaling(args)
    except _Failed as exc:
        return exc.code


def _usage(msg):
    print(f"dtrain: error: {msg}", file=sys.stderr)
    return 2


def _write_json(args, result):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _isolation_line(args, labels):
    print(f"  isolation: every run a process of its own, alternating {', '.join(labels)}, ... over "
          f"{args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps; medians of the "
          f"round medians")


class _Server:
    """One contender kept alive in its own process (``bench --framework F --serve``, serve.py)."""

    def __init__(self, args, framework, tmp):
        argv = ["bench", *child_flags(args), "--framework", framework, "--serve"]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        self.framework, self.cmd = framework, _launch(None, argv)
        self.err = open(Path(tmp) / f"{framework}.err", "w+")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     text=True)
        self.pid = self.proc.pid
        self.ready = self.read()

    def read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        code = self.proc.wait()
        self.err.seek(0)
        sys.stderr.write(self.err.read()[-4000:])
        print(f"dtrain: error: bench: the {self.framework} process ended (exit {code}): {' '.join(self.cmd)}",
              file=sys.stderr)
        raise _Failed(code or 1)

    def ask(self, request):
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def _paired_blocks(args, labels):
    """Both frameworks alive in two processes, timed in alternating blocks (order A B, B A, ...).

    Before each block every process must be idle (its CPU time stopped growing: the
    thread pools of the last block have gone to sleep), and the CPU time the idle one
    uses during the other's block is recorded: the proof that they never overlap.
    """
    from .serve import cpu_ns, wait_idle

    servers = {}
    rounds = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        try:
            for label, fw in labels.items():  # one after the other: warm-ups do not overlap either
                print(f"  starting {label} (warm-up) ...", file=sys.stderr, flush=True)
                servers[label] = _Server(args, fw, tmp)
            for k in range(args.rounds):
                order = list(labels) if k % 2 == 0 else list(labels)[::-1]
                print(f"  round {k + 1}/{args.rounds}: {', '.join(order)} ...", file=sys.stderr, flush=True)
                for label in order:
                    server, others = servers[label], [s for s in servers.values() if s is not servers[label]]
                    waited = wait_idle([s.pid for s in servers.values()])
                    before = [cpu_ns(s.pid) for s in others]
                    ans = server.ask(f"run {args.steps}")
                    after = [cpu_ns(s.pid) for s in others]
                    idle = sum(a - b for a, b in zip(after, before) if a is not None and b is not None) / 1e6
                    rounds[label].append({"median_ms": statistics.median(ans["times_ms"]),
                                          "foreign_load": ans["foreign_load"], "others_cpu_ms": idle,
                                          "waited_s": waited})
            finals = {label: servers[label].ask("finish")["result"] for label in labels}
        finally:
            for server in servers.values():
                server.close()
    return rounds, finals


def _compare_torch(args):
    labels = {"dtrain": "dtrain", "PyTorch": "torch"}
    blocks = args.device == "cpu" and not args.fresh_processes
    if blocks:
        results, finals = _paired_blocks(args, labels)
        merged = {label: with_rounds(finals[label], results[label]) for label in labels}
    else:
        runs = [(label, lambda tmp, fw=fw: _bench_child(args, tmp, fw, threads=args.threads))
                for label, fw in labels.items()]
        results = _alternate(args, runs)
        merged = merge_rounds(results)
    d, t = merged["dtrain"], merged["PyTorch"]
    print_header(d, "dtrain bench --compare-torch")
    print(f"  PyTorch: {t['torch_version']}, CPU capability {t['torch_cpu_capability']}, "
          f"{t['torch_threads']} threads ({t['torch_parallel']}); nn.{d['cell'].upper()}, Adam")
    mixed = d["torch_loaded"] or t["numba_loaded"]
    if blocks:
        others = max(x["others_cpu_ms"] for rs in results.values() for x in rs)
        print(f"  isolation: two processes kept alive, never running at once: blocks of {args.steps} steps "
              f"alternate (dtrain, PyTorch, then PyTorch, dtrain, ...) over {args.rounds} rounds after "
              f"{args.warmup} warm-up steps each; before each block both were idle, and during a block the "
              f"other process used at most {others:.1f} ms of CPU; medians of the block medians")
        processes = 2
    else:
        _isolation_line(args, ["dtrain", "PyTorch"])
        processes = len({x["pid"] for rs in results.values() for x in rs})
        mixed = any(x["torch_loaded"] for x in results["dtrain"]) or \
            any(x["numba_loaded"] for x in results["PyTorch"])
        others = None
    print(f"  {processes} processes; " + ("a process loaded both frameworks!" if mixed else
          "no dtrain process imported torch, no PyTorch process loaded Numba (dtrain's kernels)"))
    print_rounds(["dtrain", "PyTorch"], results, ("PyTorch", "dtrain"), "PyTorch ms / dtrain ms")
    print_dtrain_line(d)
    print(f"  PyTorch: {t['median_ms']:8.1f} ms/step  {t['tokens_per_s']:9,.0f} tokens/s")
    lo, hi = ratio_range(results, "dtrain", "PyTorch")
    ratio = t["median_ms"] / d["median_ms"]
    best_d, best_t = min(d["round_medians_ms"]), min(t["round_medians_ms"])
    print(f"  dtrain / PyTorch tokens/s: {ratio:.2f}x (rounds {lo:.2f}x to {hi:.2f}x; best rounds "
          f"{best_d:.1f} ms vs {best_t:.1f} ms: {best_t / best_d:.2f}x)")
    print_floor(d)
    if d["device"] != "cpu":
        from .gpu import print_gpu_lines

        print_gpu_lines(d)
    out = dict(d)
    out.update({"isolation": "two processes, alternating blocks" if blocks else
                "a new process per framework and round", "rounds": args.rounds,
                "torch_version": t["torch_version"], "torch_median_ms": t["median_ms"],
                "torch_tokens_per_s": t["tokens_per_s"], "speedup_vs_torch": ratio,
                "speedup_range": [lo, hi], "speedup_best_rounds": best_t / best_d, "torch": t,
                "processes": processes, "frameworks_mixed": mixed, "idle_other_cpu_ms_max": others,
                "round_ms": [{"dtrain": a["median_ms"], "torch": b["median_ms"]}
                             for a, b in zip(results["dtrain"], results["PyTorch"])]})
    _write_json(args, out)
    return 0


def _compare_trainer(args):
    ranks = args.ranks if args.ranks and args.ranks > 1 else None
    runs = [("bench", lambda tmp: _bench_child(args, tmp, "dtrain", ranks, args.threads, ["--no-floor"])),
            ("trainer", lambda tmp: _trainer_child(args, tmp, ranks, args.threads))]
    results = _alternate(args, runs)
    merged = merge_rounds(results)
    b, t = merged["bench"], merged["trainer"]
    print_header(b, "dtrain bench --compare-trainer")
    print(f"  trainer: `dtrain train` with the same model, batch, data and seed; its ms/step from "
          f"metrics.jsonl (intervals of {TRAINER_LOG_EVERY} steps, the first left out)")
    _isolation_line(args, ["bench", "trainer"])
    print_rounds(["bench", "trainer"], results, ("trainer", "bench"), "trainer / bench")
    print_dtrain_line(b, "bench  ")
    print(f"  trainer: {t['median_ms']:8.1f} ms/step  {t['tokens_per_s']:9,.0f} tokens/s (logged)")
    lo, hi = ratio_range(results, "bench", "trainer")
    print(f"  trainer / bench ms/step: {t['median_ms'] / b['median_ms']:.3f} (rounds {lo:.3f} to {hi:.3f}); "
          f"trainer / bench step without batch assembly: {t['median_ms'] / b['step_only_ms']:.3f}")
    out = {"bench": b, "trainer": t, "rounds": args.rounds,
           "trainer_over_bench": t["median_ms"] / b["median_ms"],
           "trainer_over_bench_step_only": t["median_ms"] / b["step_only_ms"]}
    _write_json(args, out)
    return 0


def _strong_scaling(args):
    P = args.strong_scaling
    C = args.threads or cores()
    if P < 2 or C % P:
        return _usage(f"--strong-scaling {P}: expected a number of ranks >= 2 that divides the {C} threads "
                      f"of one rank (--threads)")
    if args.batch_size % P:
        return _usage(f"--strong-scaling {P}: --batch-size {args.batch_size} is not divisible by {P} ranks")
    one, many = f"1 rank x {C} threads", f"{P} ranks x {C // P} thread(s)"
    runs = [(one, lambda tmp: _bench_child(args, tmp, "dtrain", None, C, ["--no-floor"])),
            (many, lambda tmp: _bench_child(args, tmp, "dtrain", P, C // P, ["--no-floor"]))]
    results = _alternate(args, runs)
    merged = merge_rounds(results)
    a, b = merged[one], merged[many]
    print_header(a, f"dtrain bench --strong-scaling {P} (global batch {args.batch_size})")
    _isolation_line(args, [one, many])
    print_rounds([one, many], results, (one, many), "speed-up")
    print_dtrain_line(a, f"{one:>22}")
    print_dtrain_line(b, f"{many:>22}")
    print_comm(b)
    speedup = a["median_ms"] / b["median_ms"]
    print(f"  {many} / {one}: {speedup:.2f}x the speed at the same global batch")
    _write_json(args, {"one_rank": a, "ranks": b, "P": P, "threads": C, "speedup": speedup,
                       "rounds": args.rounds})
    return 0
