"""Every contender in a process of its own, one at a time, alternating.

Two frameworks timed in one process share its cores with each other's idle
thread pools (OpenBLAS's pthreads, PyTorch's OpenMP workers keep spinning
after their own work), which slows whichever runs second. So each contender
gets a process, and only one runs at a time, in one of two ways:

* ``paired_blocks``: two processes kept alive (``benchmarks.contender --serve``)
  alternate blocks of ``--steps`` steps, A B then B A, for ``--rounds`` rounds.
  Before each block both must be idle (their CPU time stopped growing: the last
  block's thread pools sleep), and the CPU time the idle one uses during the
  other's block is recorded: the proof that they never overlap. Short blocks
  pair the two closely in time, so the slow drifts of a shared host hit both.
* ``alternate``: a new process (or mpiexec job) per contender and round, each
  run to its end; the parent measures how much of the machine others used
  while it ran.

A failed child ends the comparison with its exit code (``Failed``) and its
last stderr lines, after one line saying which run failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dtrain.bench.relaunch import bench_flags, launch
from dtrain.commands.bench import add_workload_arguments

from .load import ForeignLoad, cpu_ns, wait_idle

# Flags of a comparison that are not the children's (or that each child gets its own value of).
NOT_FORWARDED = {"rounds", "json", "ranks", "threads", "fresh_processes"}


class Failed(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def comparison_parser(module, doc):
    """``dtrain bench``'s workload flags and ``--rounds``, for ``python -m benchmarks.module``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(p)
    p.add_argument("--rounds", type=int, default=6,
                   help="alternating rounds (default 6), each of --warmup + --steps steps")
    return p


def usage_error(module, msg):
    print(f"benchmarks.{module}: error: {msg}", file=sys.stderr)
    return 2


def check_common(args):
    """One line for the flags every comparison needs, or None."""
    if args.rounds < 1:
        return f"--rounds: expected a positive integer, got {args.rounds}"
    if args.steps < 1 or args.warmup < 0:
        return (f"--steps {args.steps} --warmup {args.warmup}: expected at least 1 timed step "
                "and no negative warm-up")
    return None


def child_argv(args):
    """The children's ``dtrain bench`` workload flags: the comparison's own left out."""
    return bench_flags(args, drop=NOT_FORWARDED)


def run_child(cmd, what):
    """Run ``cmd`` to its end; (process, others' share of the machine while it ran)."""
    load = ForeignLoad(children=True).start()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    share = load.share()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        print(f"benchmarks: error: the {what} run failed (exit {proc.returncode}): "
              f"{' '.join(cmd)}", file=sys.stderr)
        raise Failed(proc.returncode or 1)
    return proc, share


def bench_child(args, tmp, ranks=None, threads=None, extra=()):
    """``dtrain bench`` with the comparison's workload in a new process (or mpiexec job)."""
    out = Path(tmp) / "child.json"
    out.unlink(missing_ok=True)
    argv = ["bench", *child_argv(args), "--json", str(out), *extra]
    if threads:
        argv += ["--threads", str(threads)]
    _, share = run_child(launch(ranks, argv), "dtrain bench")
    return json.loads(out.read_text()) | {"foreign_load": share}


def torch_child(args, tmp, threads=None):
    """PyTorch's step on the same workload, in a new process."""
    out = Path(tmp) / "torch.json"
    out.unlink(missing_ok=True)
    argv = [*child_argv(args), "--framework", "torch", "--json", str(out)]
    if threads:
        argv += ["--threads", str(threads)]
    _, share = run_child(launch(None, argv, "benchmarks.contender"), "PyTorch")
    return json.loads(out.read_text()) | {"foreign_load": share}


def alternate(args, runs):
    """Run each (label, fn(tmp)) once per round, alternating; {label: [result per round]}."""
    results = {label: [] for label, _ in runs}
    with tempfile.TemporaryDirectory(prefix="dtrain-benchmarks-") as tmp:
        for k in range(args.rounds):
            for label, fn in runs:
                print(f"  round {k + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
                results[label].append(fn(tmp))
    return results


class Server:
    """One contender kept alive in its own process (``benchmarks.contender --serve``)."""

    def __init__(self, args, framework, tmp):
        argv = [*child_argv(args), "--framework", framework, "--serve"]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        self.framework, self.cmd = framework, launch(None, argv, "benchmarks.contender")
        self.err = open(Path(tmp) / f"{framework}.err", "w+")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.pid = self.proc.pid
        self.ready = self.read()

    def read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        code = self.proc.wait()
        self.err.seek(0)
        sys.stderr.write(self.err.read()[-4000:])
        print(f"benchmarks: error: the {self.framework} process ended (exit {code}): "
              f"{' '.join(self.cmd)}", file=sys.stderr)
        raise Failed(code or 1)

    def ask(self, request):
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def _timed_block(servers, label, steps):
    """One block of ``label``'s steps once all are idle, and what the others used meanwhile."""
    server = servers[label]
    others = [s for s in servers.values() if s is not server]
    waited = wait_idle([s.pid for s in servers.values()])
    before = [cpu_ns(s.pid) for s in others]
    ans = server.ask(f"run {steps}")
    after = [cpu_ns(s.pid) for s in others]
    idle = sum(a - b for a, b in zip(after, before) if a is not None and b is not None) / 1e6
    return {"median_ms": statistics.median(ans["times_ms"]), "foreign_load": ans["foreign_load"],
            "others_cpu_ms": idle, "waited_s": waited}


def paired_blocks(args, labels):
    """{label: framework} alive in processes of their own, timed in alternating blocks (order
    A B, B A, ...); ({label: [block per round]}, {label: final result})."""
    servers = {}
    rounds = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="dtrain-benchmarks-") as tmp:
        try:
            for label, fw in labels.items():  # one after the other: warm-ups do not overlap
                print(f"  starting {label} (warm-up) ...", file=sys.stderr, flush=True)
                servers[label] = Server(args, fw, tmp)
            for k in range(args.rounds):
                order = list(labels) if k % 2 == 0 else list(labels)[::-1]
                print(f"  round {k + 1}/{args.rounds}: {', '.join(order)} ...", file=sys.stderr,
                      flush=True)
                for label in order:
                    rounds[label].append(_timed_block(servers, label, args.steps))
            finals = {label: servers[label].ask("finish")["result"] for label in labels}
        finally:
            for server in servers.values():
                server.close()
    return rounds, finals


def write_json(args, result):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
