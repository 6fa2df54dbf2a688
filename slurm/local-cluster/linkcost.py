#!/usr/bin/env python3
"""What communication costs dtrain on the local cluster's namespace hosts, per link.

    NODES=4 SLURM_ROOT=/tmp/cluster slurm/local-cluster/start.sh
    SLURM_ROOT=/tmp/cluster .venv/bin/python slurm/local-cluster/linkcost.py \\
        --data data/coco --hosts 2 --ppn 1 2 --links none 10gbit 1gbit --steps 30

For every link setting (tbf on every host's eth0: what it sends, at that rate) and every
layout (hosts x ranks per host), it trains at the CS231n sizes (H=512, W=256, N=128 per
rank by default) with launch/mpirun.py over the hosts, and prints one markdown row:
ms/step and the communication share (dtrain's own metrics, one record per step: the
medians of the steps after the warm-up), bytes per step per rank (dtrain's estimate; and
what crossed the links, from the hosts' byte counters), and the embedding reduction
dtrain chose (sparse or dense).

Timings on one machine are those of processes sharing its cores: run it on a quiet
machine with at least as many cores as ranks, and read them as what the link settings
change, not as a cluster's numbers (docs/cluster.md). A setting with delay
("1gbit+0.5ms") adds it with netdelay.py on every host (this kernel has no netem);
its packets pass through a Python process, which caps the rate it can carry. Every
link is restored at the end.
Standard library only; dtrain runs in subprocesses.

    ... linkcost.py --reduce-only ... --json runs.jsonl     # dtrain's reduction alone
    .venv/bin/python slurm/local-cluster/linkcost.py --model [--fit runs.jsonl] \\
        [--plot docs/cluster-comm.png]

``--reduce-only`` times dtrain's reducer alone (reducecost.py, a barrier before each of
``--steps`` repetitions) instead of training. ``--model`` prints the communication model
(commmodel.py; docs/cluster.md): with ``--fit``, its latency per round fitted per link
setting (the bandwidth: the link's rate) to the reduce-only runs of a JSON file written
by ``--json`` (least squares, residuals), checked against the training runs in the same
file, and the projection to 128 nodes for each variant (float32, --overlap-reduce,
--reduce-dtype bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import commmodel  # noqa: E402  (beside this script)

REPO = HERE.parents[1]
ON_NODE = HERE / "on-node.sh"
MPIRUN = REPO / "launch" / "mpirun.py"


def on_node(root: str, node: str, *cmd: str, check: bool = True) -> str:
    r = subprocess.run([str(ON_NODE), node, *cmd], env=dict(os.environ, SLURM_ROOT=root),
                       capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise SystemExit(f"linkcost: on {node}: {' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def tbf_args(rate: str) -> list[str]:
    """tbf for ``rate`` (e.g. 10gbit): a bucket of 10 ms at that rate, so a fast rate is
    not limited by the kernel timer, and a queue of 50 ms."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if not m:
        raise SystemExit(f"linkcost: --links {rate}: expected none or a rate like 1gbit")
    bits = float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    burst = max(64 * 1024, int(bits / 8 * 0.01))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def parse_link(link: str) -> tuple[str, float]:
    """``none``, ``RATE`` or ``RATE+DELAYms`` -> (rate or "none", added delay in ms)."""
    rate, _, delay = link.partition("+")
    if rate != "none":
        tbf_args(rate)
    if not delay:
        return rate, 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)ms", delay)
    if not m:
        raise SystemExit(f"linkcost: --links {link}: expected a delay like +0.5ms")
    return rate, float(m.group(1))


def shape(root: str, nodes: list[str], link: str) -> list[subprocess.Popen]:
    """Shape every host's link; the netdelay.py processes started for the delay."""
    rate, delay = parse_link(link)
    for node in nodes:
        on_node(root, node, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        if rate != "none":
            on_node(root, node, "tc", "qdisc", "replace", "dev", "eth0", "root",
                    *tbf_args(rate))
    procs = []
    for node in nodes if delay else []:
        proc = subprocess.Popen([str(ON_NODE), node, sys.executable, str(HERE / "netdelay.py"),
                                 "--delay-ms", str(delay), "--seconds", "86400"],
                                env=dict(os.environ, SLURM_ROOT=root), stderr=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        if "netdelay: ready" not in proc.stderr.readline():
            unshape(procs)
            raise SystemExit(f"linkcost: netdelay.py did not start on {node}")
    return procs


def unshape(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()  # it removes its rule
        proc.wait(timeout=30)


def link_bytes(root: str, node: str) -> int:
    """Bytes ``node`` sent plus received on eth0."""
    out = on_node(root, node, "cat", "/sys/class/net/eth0/statistics/rx_bytes",
                  "/sys/class/net/eth0/statistics/tx_bytes")
    return sum(int(x) for x in out.split())


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def run_once(opts, root: str, nodes: list[str], ppn: int, workdir: Path) -> dict:
    """One training run; its steady-state metrics (medians over the steps after the
    warm-up, one record per step) and the bytes on the links."""
    hostfile = workdir / "hostfile"
    hostfile.write_text("".join(f"{n}:{ppn}\n" for n in nodes))
    ranks = len(nodes) * ppn
    ckpt = workdir / "ckpt"
    cmd = [sys.executable, str(MPIRUN), "-n", str(ranks), "--ppn", str(ppn), "--hostfile",
           str(hostfile), "--rsh", str(Path(root) / "bin" / "rsh"), "--threads",
           str(opts.threads), "--", "train", "--checkpoint-dir", str(ckpt), "--steps",
           str(opts.steps), "--batch-size", str(opts.per_rank * ranks), "--hidden-dim",
           str(opts.hidden), "--wordvec-dim", str(opts.wordvec), "--cell", opts.cell,
           "--eval-every", "0", "--eval-images", "1", "--log-every", "1",
           "--checkpoint-every", "0", "--quiet", *opts.extra.split()]
    if opts.data:
        cmd += ["--data", opts.data]
    before = sum(link_bytes(root, n) for n in nodes)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    after = sum(link_bytes(root, n) for n in nodes)
    if r.returncode != 0:
        raise SystemExit(f"linkcost: training failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    recs = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x.get("kind") == "train"][WARMUP_STEPS:]
    if len(train) < 3:
        raise SystemExit("linkcost: too few steps after the warm-up; raise --steps")
    step_ms = median([x["step_ms"] for x in train])
    comm_ms = median([x["comm_ms"] for x in train])
    return {"ranks": ranks, "ms": step_ms, "comm_ms": comm_ms, "comm": comm_ms / step_ms,
            "steps_ms": [x["step_ms"] for x in train], "comms_ms": [x["comm_ms"] for x in train],
            "est_bytes": median([x["bytes_per_step"] for x in train]),
            "embed": train[-1].get("embed_reduce"),
            # a byte between hosts is sent by one rank and received by another, as in
            # dtrain's count; bytes between ranks of one host never reach a link
            "link_bytes": (after - before) / opts.steps / ranks}


WARMUP_STEPS = 2  # the first steps compile, allocate and fill caches


def reduce_once(opts, root: str, nodes: list[str], ppn: int, workdir: Path) -> dict:
    """The reduction alone (reducecost.py) over the hosts: its median time and spread."""
    hostfile = workdir / "hostfile"
    hostfile.write_text("".join(f"{n}:{ppn}\n" for n in nodes))
    ranks = len(nodes) * ppn
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), "-f", str(hostfile),
           "-ppn", str(ppn), "-launcher", "ssh", "-launcher-exec", str(Path(root) / "bin" / "rsh"),
           sys.executable, str(HERE / "reducecost.py"), "--repeat", str(opts.steps),
           *opts.extra.split()]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    before = sum(link_bytes(root, n) for n in nodes)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout, env=env)
    after = sum(link_bytes(root, n) for n in nodes)
    if r.returncode != 0:
        raise SystemExit(f"linkcost: reducecost.py failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ranks": ranks, "ms": res["reduce_ms"], "comm_ms": res["reduce_ms"], "comm": 1.0,
            "p10_ms": res["p10_ms"], "p90_ms": res["p90_ms"], "est_bytes": res["bytes"],
            "embed": res["embed"], "link_bytes": (after - before) / (opts.steps + 3) / ranks}


# ------------------------------------------------------------------ the model and its fit
REAL_LINKS = [("10 Gbit/s, 20 us", 10e9 / 8, 20e-6), ("10 Gbit/s, 50 us", 10e9 / 8, 50e-6),
              ("1 Gbit/s, 50 us", 1e9 / 8, 50e-6)]
COMPUTE_S = 0.115  # N=128, 1 rank x 2 threads on this machine, quiet (docs/performance.md)


def print_model(records_path: str | None, plot: str | None) -> None:
    """The fit of commmodel.py to the reduce-only records, its check against the training
    records (1 rank per host), and the projection to 128 nodes."""
    fits = {}
    if records_path:
        recs = [json.loads(line) for line in Path(records_path).read_text().splitlines()]
        print("| variant | link | B (fit) | L (fit) | points (P: measured -> model, ms) "
              "| residual rms |\n|---|---|---|---|---|---|")
        for variant in ("fp32", "bf16"):
            for link, f in commmodel.fit_records(recs, variant).items():
                if variant == "fp32":
                    fits[link] = f
                pts = ", ".join(f"{q[3]}: {1e3 * q[2]:.0f} -> {1e3 * (q[2] - r):.0f}"
                                for q, r in sorted(zip(f["points"], f["residuals"]),
                                                   key=lambda z: z[0][3]))
                rms = (sum(r * r for r in f["residuals"]) / len(f["residuals"])) ** 0.5
                bw = "inf" if f["B"] == float("inf") else f"{8 * f['B'] / 1e9:.2f} Gbit/s"
                print(f"| {variant} | {link} | {bw} | {1e3 * f['L']:.2f} ms | {pts} "
                      f"| {1e3 * rms:.0f} ms |")
        print("\ncheck against training (1 rank per host, fp32; comm ms median -> model):")
        for r in recs:
            if not r.get("reduce_only") and r.get("ppn") == 1 and r.get("variant") == "fp32" \
                    and r["link"] in fits:
                f = fits[r["link"]]
                model = commmodel.comm_seconds(r["ranks"], f["B"],
                                               f["L"] * max(1.0, r["ranks"] / 2))
                print(f"  {r['link']} {r['hosts']} hosts: {r['comm_ms']:.0f} -> {1e3 * model:.0f}")
    print(f"\nprojection, compute {1e3 * COMPUTE_S:.0f} ms/step; ms per step (share):\n")
    print(commmodel.projection_table(COMPUTE_S, REAL_LINKS))
    if plot:
        commmodel.plot(plot, COMPUTE_S, REAL_LINKS[:2], fits)
        print(f"\nplot: {plot}")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--model" in argv:
        plot = argv[argv.index("--plot") + 1] if "--plot" in argv else None
        fit = argv[argv.index("--fit") + 1] if "--fit" in argv else None
        print_model(fit, plot)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="COCO-layout data (default: the built-in data set)")
    p.add_argument("--hosts", type=int, nargs="+", default=[2], help="host counts to try")
    p.add_argument("--ppn", type=int, nargs="+", default=[1, 2], help="ranks per host")
    p.add_argument("--links", nargs="+", default=["none", "10gbit", "1gbit", "1gbit+0.5ms"],
                   help="link settings: none, a tbf rate such as 1gbit, and +DELAYms")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--per-rank", type=int, default=128, help="N, images per rank per step")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--wordvec", type=int, default=256)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--repeat", type=int, default=1, help="runs per setting (medians, spread)")
    p.add_argument("--extra", default="", help="more flags for dtrain train, one string")
    p.add_argument("--label", default="", help="a name for --extra in the table and JSON")
    p.add_argument("--json", help="append one JSON line per run to this file (for --fit)")
    p.add_argument("--reduce-only", action="store_true",
                   help="time dtrain's reduction alone (reducecost.py; --steps repetitions, "
                        "--extra its flags) instead of training")
    opts = p.parse_args(argv)
    root = os.environ.get("SLURM_ROOT")
    if not root or not (Path(root) / "hosts" / "state").exists():
        raise SystemExit("linkcost: set SLURM_ROOT to a cluster started with NODES >= 2")
    have = int(re.search(r"NODES=(\d+)", (Path(root) / "hosts" / "state").read_text())[1])
    if max(opts.hosts) > have:
        raise SystemExit(f"linkcost: --hosts {max(opts.hosts)}: the cluster has {have} hosts")
    for link in opts.links:
        parse_link(link)
    nodes_all = [f"node{i}" for i in range(1, have + 1)]
    print("| link | hosts x ranks | variant | ms/step (median; runs) | comm share "
          "| bytes/step/rank (dtrain) | bytes/step/rank (links) | embedding |")
    print("|---|---|---|---|---|---|---|---|")
    procs = []
    try:
        for link in opts.links:
            unshape(procs)
            procs = shape(root, nodes_all, link)
            for hosts in opts.hosts:
                for ppn in opts.ppn:
                    runs = []
                    for _ in range(opts.repeat):
                        once = reduce_once if opts.reduce_only else run_once
                        with tempfile.TemporaryDirectory(prefix="linkcost-") as tmp:
                            res = once(opts, root, nodes_all[:hosts], ppn, Path(tmp))
                        res.update(link=link, hosts=hosts, ppn=ppn, variant=opts.label,
                                   reduce_only=opts.reduce_only,
                                   per_rank=opts.per_rank, threads=opts.threads)
                        runs.append(res)
                        if opts.json:
                            with open(opts.json, "a") as f:
                                f.write(json.dumps(res) + "\n")
                    ms = [r["ms"] for r in runs]
                    share = [100 * r["comm"] for r in runs]
                    print(f"| {link} | {hosts} x {ppn} | {opts.label or '-'} "
                          f"| {median(ms):.0f} ({', '.join(f'{x:.0f}' for x in ms)}) "
                          f"| {median(share):.0f}% ({', '.join(f'{x:.0f}' for x in share)}) "
                          f"| {runs[0]['est_bytes'] / 1e6:.2f} MB "
                          f"| {median([r['link_bytes'] for r in runs]) / 1e6:.2f} MB "
                          f"| {runs[-1]['embed']} |", flush=True)
    finally:
        unshape(procs)
        shape(root, nodes_all, "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
