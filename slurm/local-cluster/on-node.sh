#!/bin/bash
# Run a command on a namespace host of the local cluster (start.sh with NODES > 1):
#     slurm/local-cluster/on-node.sh node2 hostname
#     slurm/local-cluster/on-node.sh node2 ip -s link show eth0          # its link's counters
#     slurm/local-cluster/on-node.sh node2 ip link set eth0 down         # cut its cable
#     slurm/local-cluster/on-node.sh node2 tc qdisc replace dev eth0 root tbf \
#         rate 100mbit burst 64kb latency 50ms                           # shape what it sends
# The command runs in the host's network, UTS and mount namespaces (its hostname,
# addresses, /etc/hosts, /dev/shm, boot_id), as a child of this shell: the same user,
# environment and working directory. Needs root. SLURM_ROOT as for start.sh.
set -euo pipefail
SLURM_ROOT=${SLURM_ROOT:-$PWD/local-slurm}
[ $# -ge 2 ] || { echo "usage: on-node.sh NODE COMMAND [ARG...]" >&2; exit 2; }
node=$1
shift
pidfile=$SLURM_ROOT/hosts/$node.pid
[ -f "$pidfile" ] || { echo "on-node.sh: no host $node under $SLURM_ROOT/hosts" >&2; exit 2; }
pid=$(cat "$pidfile")
# a stale pid file may name a reused pid: only the holder process of that host will do
if ! tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "^dtrain-host-$node "; then
    echo "on-node.sh: host $node (holder pid $pid) is not running" >&2
    exit 2
fi
exec nsenter -t "$pid" -n -u -m --wd="$PWD" -- "$@"
