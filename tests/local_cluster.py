"""The test session's local Slurm cluster (slurm/local-cluster/), for tests/conftest.py.

One cluster for the whole session: NODES namespace hosts (node1..nodeK, each its own
network, hostname, /etc/hosts, /dev/shm and boot_id, one slurmd each) when this
process may make namespaces (root), else the one-node cluster on localhost. The
one-node tests (tests/test_slurm.py) run on either; the multi-host tests
(tests/test_multinode.py) need the hosts and skip with the reason without them
(in CI, CI set, they fail instead).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster"
BIN = Path(sys.executable).parent  # the venv's bin: python3 and mpiexec for the jobs
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
HOSTS = 3  # namespace hosts: 2 for a job, a third to resubmit on after one is lost


def slurm_missing() -> list[str]:
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    return missing + [c for c in CLIENTS if shutil.which(c) is None]


def ensure_slurm_installed():
    missing = slurm_missing()
    if not missing:
        return
    in_ci = bool(os.environ.get("CI"))
    if shutil.which("apt-get") is None:
        reason = (
            f"Slurm is not installed ({', '.join(missing)} missing) and apt-get is "
            "unavailable; install slurmd slurmctld slurm-client munge libpmix-dev"
        )
        if in_ci:
            pytest.fail(reason)
        pytest.skip(reason)
    r = subprocess.run(
        ["bash", str(CLUSTER / "install.sh")], capture_output=True, text=True, timeout=900
    )
    if r.returncode != 0 or slurm_missing():
        msg = f"slurm/local-cluster/install.sh failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
        if in_ci or os.geteuid() == 0:
            pytest.fail(msg)
        pytest.skip("cannot install Slurm without root: " + msg)


def namespaces_unavailable() -> str | None:
    """Why namespace hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "namespace hosts need root (network, UTS and mount namespaces, veth links)"
    for tool in ("ip", "unshare", "nsenter", "tc", "iptables-legacy"):
        if shutil.which(tool) is None:
            return (f"namespace hosts need `{tool}` (iproute2, util-linux, iptables), "
                    "which is missing")
    # In a throwaway network namespace: what the hosts are made of (a bridge, a veth
    # pair) and how the tests shape a link (tbf, and an NFQUEUE rule for netdelay.py).
    # Nothing of this machine's is touched.
    probe = ("ip link add b0 type bridge && ip link add v0 type veth peer name v1 && "
             "ip link set lo up && tc qdisc add dev lo root tbf rate 1mbit burst 16kb limit 64kb"
             " && iptables-legacy -A OUTPUT -o lo -j NFQUEUE --queue-num 0 --queue-bypass")
    r = subprocess.run(
        ["unshare", "--net", "--uts", "--mount", "sh", "-c", probe], capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    if r.returncode != 0:
        return f"cannot make namespace hosts here ({probe}: {r.stderr.strip()})"
    return None


def stop_abandoned(parent: Path, prefix: str = "dtrain-slurm-") -> list[Path]:
    """Stop and remove the clusters of test sessions that died without stopping them
    (killed with SIGKILL: no teardown, no atexit). A session's cluster directory holds
    its pid in ``owner.pid``; only those whose owner is gone are touched."""
    stopped = []
    for root in sorted(parent.glob(prefix + "*")):
        owner = root / "owner.pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue  # not a session's cluster, or one being made
        if Path(f"/proc/{pid}").exists():
            continue
        env = dict(os.environ, SLURM_ROOT=str(root))
        subprocess.run(["bash", str(CLUSTER / "stop.sh")], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        stopped.append(root)
    return stopped


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """A running slurm/local-cluster: its environment, and commands on it and its hosts.

    ``nodes``: the Slurm node names (``["localhost"]``, or node1..nodeK on
    namespace hosts); ``no_hosts``: why there are no namespace hosts, or None.
    """

    def __init__(self, root: Path, nodes: int, no_hosts: str | None = None):
        self.root = root
        self.conf = root / "slurm.conf"
        self.nodes = ["localhost"] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        self.no_hosts = no_hosts
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs use this venv
        self.env = env
        self._stopped = False

    @property
    def hostfile(self) -> Path:
        return self.root / "hostfile"

    @property
    def rsh(self) -> Path:
        return self.root / "bin" / "rsh"

    def start(self):
        ctld, slurmd = _free_ports(2)
        env = dict(self.env, SLURM_ROOT=str(self.root), CTLD_PORT=str(ctld))
        env.update(SLURMD_PORT=str(slurmd), NCPUS="8", CRED_EXPIRE="10")
        env["NODES"] = str(len(self.nodes))
        r = subprocess.run(
            ["bash", str(CLUSTER / "start.sh")], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if r.returncode != 0:
            self.stop()
            pytest.fail(f"start.sh failed:\n{r.stdout}\n{r.stderr}\n{self.logs()}")

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        subprocess.run(
            ["bash", str(CLUSTER / "stop.sh")], env=dict(self.env, SLURM_ROOT=str(self.root)),
            capture_output=True, timeout=120,
        )  # fmt: skip

    def logs(self, lines=30) -> str:
        out = []
        for p in sorted((self.root / "log").glob("slurm*.log")):
            tail = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p.name} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    def run(self, *cmd, check=True, timeout=60, env=None):
        r = subprocess.run(
            list(map(str, cmd)), env=env or self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr}")
        return r

    def on_node(self, node: str, *cmd, check=True, timeout=60):
        """``cmd`` on namespace host ``node`` (slurm/local-cluster/on-node.sh)."""
        env = dict(self.env, SLURM_ROOT=str(self.root))
        return self.run(str(CLUSTER / "on-node.sh"), node, *cmd, check=check, timeout=timeout,
                        env=env)

    def link_bytes(self, node: str) -> tuple[int, int]:
        """(received, sent) bytes of ``node``'s eth0, its only link."""
        out = self.on_node(node, "cat", "/sys/class/net/eth0/statistics/rx_bytes",
                           "/sys/class/net/eth0/statistics/tx_bytes").stdout.split()
        return int(out[0]), int(out[1])

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))
