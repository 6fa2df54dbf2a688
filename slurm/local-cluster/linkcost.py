#!/usr/bin/env python3
"""What communication costs dtrain on the local cluster's namespace hosts, per link.

    NODES=4 SLURM_ROOT=/tmp/cluster slurm/local-cluster/start.sh
    SLURM_ROOT=/tmp/cluster .venv/bin/python slurm/local-cluster/linkcost.py \\
        --data data/coco --hosts 2 --ppn 1 2 --links none 10gbit 1gbit --steps 30

For every link setting (tbf on every host's eth0: what it sends, at that rate) and every
layout (hosts x ranks per host), it trains at the CS231n sizes (H=512, W=256, N=128 per
rank by default) with launch/mpirun.py over the hosts, and prints one markdown row:
ms/step and the communication share (dtrain's own metrics, the intervals after the
first), bytes per step per rank (dtrain's estimate; and what crossed the links, from
the hosts' byte counters), and the embedding reduction dtrain chose (sparse or dense).

Timings on one machine are those of processes sharing its cores: run it on a quiet
machine with at least as many cores as ranks, and read them as what the link settings
change, not as a cluster's numbers (docs/cluster.md). A setting with delay
("1gbit+0.5ms") adds it with netdelay.py on every host (this kernel has no netem);
its packets pass through a Python process, which caps the rate it can carry. Every
link is restored at the end.
Standard library only; dtrain runs in subprocesses.

    .venv/bin/python slurm/local-cluster/linkcost.py --model [--plot docs/cluster-comm.png]

prints the communication model instead (``step_model``; docs/cluster.md): bytes and
time per step against ranks P, link bandwidth and latency, projected to 128 nodes.
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


def run_once(opts, root: str, nodes: list[str], ppn: int, workdir: Path) -> dict:
    """One training run; its steady-state metrics and the bytes on the links."""
    hostfile = workdir / "hostfile"
    hostfile.write_text("".join(f"{n}:{ppn}\n" for n in nodes))
    ranks = len(nodes) * ppn
    ckpt = workdir / "ckpt"
    cmd = [sys.executable, str(MPIRUN), "-n", str(ranks), "--ppn", str(ppn), "--hostfile",
           str(hostfile), "--rsh", str(Path(root) / "bin" / "rsh"), "--threads",
           str(opts.threads), "--", "train", "--checkpoint-dir", str(ckpt), "--steps",
           str(opts.steps), "--batch-size", str(opts.per_rank * ranks), "--hidden-dim",
           str(opts.hidden), "--wordvec-dim", str(opts.wordvec), "--cell", opts.cell,
           "--eval-every", "0", "--eval-images", "1", "--log-every",
           str(max(1, opts.steps // 3)), "--checkpoint-every", "0", "--quiet"]
    if opts.data:
        cmd += ["--data", opts.data]
    before = sum(link_bytes(root, n) for n in nodes)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    after = sum(link_bytes(root, n) for n in nodes)
    if r.returncode != 0:
        raise SystemExit(f"linkcost: training failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    recs = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x.get("kind") == "train"][1:]  # the first has the warm-up
    if not train:
        raise SystemExit("linkcost: too few steps for a steady-state interval; raise --steps")
    mean = lambda key: sum(x[key] for x in train) / len(train)  # noqa: E731
    return {"ranks": ranks, "ms": mean("step_ms"), "comm": mean("comm_share"),
            "est_bytes": mean("bytes_per_step"), "embed": train[-1].get("embed_reduce"),
            # a byte between hosts is sent by one rank and received by another, as in
            # dtrain's count; bytes between ranks of one host never reach a link
            "link_bytes": (after - before) / opts.steps / ranks}


# ------------------------------------------------------------------ the model
# CS231n sizes, float32: the dense gradient (everything but the word embedding) of
# the LSTM with H=512, W=256, V=1004 and 512 input features, and the embedding.
DENSE_BYTES = 4 * (512 * 512 + 512 + 256 * 2048 + 512 * 2048 + 2048 + 512 * 1004 + 1004)
VOCAB, WORDVEC = 1004, 256
ROWS_PER_RANK = 232  # distinct words in a rank's N=128 batch of the built-in data (measured)


def step_bytes(p: int, rows_per_rank: int = ROWS_PER_RANK) -> tuple[float, str]:
    """(bytes one rank sends plus receives per step, embedding reduction), as dtrain's
    reducer counts them: a ring Allreduce of the dense gradient, 4(P-1)/P S, and the
    cheaper of the embedding's sparse Allgatherv of every rank's rows (id + W floats)
    and its dense Allreduce."""
    if p < 2:
        return 0.0, "local"
    ring = (p - 1) / p
    sparse = 2 * ring * p * rows_per_rank * (4 * WORDVEC + 8)
    dense = 4 * ring * VOCAB * WORDVEC * 4
    return 4 * ring * DENSE_BYTES + min(sparse, dense), "sparse" if sparse < dense else "dense"


def step_model(p: int, gbit: float, latency_s: float, compute_s: float) -> dict:
    """Step time with one rank per node: compute, then the reduction (no overlap today).

    The reduction sends half of ``step_bytes`` and receives the other half at once over a
    full-duplex link of ``gbit``, and pays ``latency_s`` per ring round: 2(P-1) for the
    dense Allreduce, P-1 for the embedding's Allgatherv, log2 P for the small Allgather
    of row counts and losses.
    """
    nbytes, embed = step_bytes(p)
    rounds = 2 * (p - 1) + (p - 1 if embed == "sparse" else 0) + max(1, (p - 1).bit_length())
    comm = nbytes / 2 / (gbit * 1e9 / 8) + rounds * latency_s if p > 1 else 0.0
    return {"bytes": nbytes, "embed": embed, "comm_s": comm, "step_s": compute_s + comm,
            "share": comm / (compute_s + comm)}


def print_model(plot: str | None) -> None:
    links = [(10, 20e-6), (10, 0.5e-3), (1, 20e-6), (1, 0.5e-3)]
    computes = [("CPU, N=128, 2 threads", 0.115), ("GPU (H100), N=128", 0.0016)]
    ps = [2, 3, 4, 8, 32, 128]
    print("| compute | link | " + " | ".join(f"P={p}" for p in ps) + " |")
    print("|---|---|" + "---|" * len(ps))
    for name, tc in computes:
        for gbit, lat in links:
            cells = []
            for p in ps:
                m = step_model(p, gbit, lat, tc)
                cells.append(f"{1e3 * m['step_s']:.1f} ms ({100 * m['share']:.0f}%)")
            print(f"| {name} | {gbit} Gbit/s, {1e3 * lat:g} ms | " + " | ".join(cells) + " |")
    print("\n| P | bytes/step/rank | embedding |\n|---|---|---|")
    for p in ps:
        nbytes, embed = step_bytes(p)
        print(f"| {p} | {nbytes / 1e6:.2f} MB | {embed} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        grid = [2 ** k for k in range(1, 8)]
        for name, tc in computes:
            for gbit, lat in links:
                ax.plot(grid, [100 * step_model(p, gbit, lat, tc)["share"] for p in grid],
                        marker="o", ls="-" if tc > 0.01 else "--",
                        label=f"{name}; {gbit} Gbit/s, {1e3 * lat:g} ms")
        ax.axhline(15, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nodes (1 rank each)")
        ax.set_ylabel("communication share of the step, %")
        ax.set_title("dtrain at CS231n sizes (H=512, W=256, V=1004): model")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"\nplot: {plot}")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--model" in argv:
        plot = argv[argv.index("--plot") + 1] if "--plot" in argv else None
        print_model(plot)
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
    print("| link | hosts x ranks | ms/step | comm share | bytes/step/rank (dtrain) "
          "| bytes/step/rank (links) | embedding |")
    print("|---|---|---|---|---|---|---|")
    procs = []
    try:
        for link in opts.links:
            unshape(procs)
            procs = shape(root, nodes_all, link)
            for hosts in opts.hosts:
                for ppn in opts.ppn:
                    with tempfile.TemporaryDirectory(prefix="linkcost-") as tmp:
                        res = run_once(opts, root, nodes_all[:hosts], ppn, Path(tmp))
                    print(f"| {link} | {hosts} x {ppn} | {res['ms']:.1f} "
                          f"| {100 * res['comm']:.0f}% "
                          f"| {res['est_bytes'] / 1e6:.2f} MB | {res['link_bytes'] / 1e6:.2f} MB "
                          f"| {res['embed']} |", flush=True)
    finally:
        unshape(procs)
        shape(root, nodes_all, "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
