#!/bin/bash
# Namespace hosts on this machine: "hosts.sh up K" makes node1..nodeK, "hosts.sh down"
# removes everything "up" made. Used by start.sh (NODES=K > 1) and stop.sh.
#
# A host is one process (the holder, "sleep infinity" named dtrain-host-nodeN) in its
# own network, UTS and mount namespaces:
#   * hostname nodeN (UTS);
#   * eth0, one end of a veth pair whose other end is on a bridge in the machine's
#     namespace; addresses on one private /24 that no route of the machine uses:
#     the bridge (the machine, where slurmctld and the user's shell are) .1, nodeN .(10+N);
#   * its own /etc/hosts (every host, and the machine's hostname as the bridge address),
#     /dev/shm (a tmpfs), and /proc/sys/kernel/random/boot_id (bind mounts in its mount
#     namespace; nothing of the machine's /etc is touched). MPICH/UCX decide "same
#     machine" from boot_id: without a host's own, ranks on different hosts would talk
#     through shared memory instead of the link;
#   * its own sysfs (UCX reads /sys/class/net, which must show the host's interfaces),
#     with the machine's /sys/fs/cgroup carried over (slurmd wants it mounted).
# The rest of the file system is shared, like a cluster's shared file system.
# Everything made is written to $SLURM_ROOT/hosts/state before it is made, so "down"
# removes it after a crash too.
# Settings (environment): SLURM_ROOT (required), NET_ID (1-250: the subnet
# 10.213.NET_ID.0/24 and the link names dt<NET_ID>br, dt<NET_ID>n<N>; default: the
# first one free).
set -euo pipefail
: "${SLURM_ROOT:?SLURM_ROOT must be set}"
HOSTS=$SLURM_ROOT/hosts
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "hosts.sh: $*" >&2; exit 2; }

net_free() {  # id: no link of that name and no route into its subnet
    ! ip link show "dt$1br" >/dev/null 2>&1 &&
        ! ip -4 route show | grep -q "^10\.213\.$1\." &&
        ! ip -4 addr show | grep -q " 10\.213\.$1\."
}

holder_pid() {  # node -> pid of its live holder, or nothing
    local f=$HOSTS/$1.pid pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "^dtrain-host-$1 " && echo "$pid"
    return 0
}

up() {
    local k=$1 id node pid i addr
    [[ $k =~ ^[0-9]+$ ]] && [ "$k" -ge 2 ] && [ "$k" -le 9 ] || die "NODES: expected 2 to 9, got $k"
    [ "$(id -u)" -eq 0 ] || die "namespace hosts need root (ip, unshare, mount)"
    for exe in ip unshare nsenter mount; do
        command -v "$exe" >/dev/null || die "$exe not found (iproute2, util-linux)"
    done
    [ ! -f "$HOSTS/state" ] || die "$HOSTS/state exists: run stop.sh first"
    mkdir -p "$HOSTS"
    # the bridge's name claims the subnet: creating it is atomic, so two clusters
    # started at once never share one
    id=
    for i in ${NET_ID:-$(seq 1 250)}; do
        if net_free "$i" && ip link add "dt${i}br" type bridge 2>/dev/null; then
            id=$i
            break
        fi
    done
    [ -n "$id" ] || die "no free subnet among 10.213.${NET_ID:-1-250}.0/24 (or link dt<id>br)"
    local net=10.213.$id
    printf 'NET_ID=%s\nNODES=%s\nlink dt%sbr\n' "$id" "$k" "$id" >"$HOSTS/state"
    ip addr add "$net.1/24" dev "dt${id}br"
    ip link set "dt${id}br" up
    {
        echo "127.0.0.1 localhost"
        echo "$net.1 $(hostname) head"
        for i in $(seq 1 "$k"); do echo "$net.$((10 + i)) node$i"; done
    } >"$HOSTS/etc-hosts"
    for i in $(seq 1 "$k"); do
        node=node$i
        cat /proc/sys/kernel/random/uuid >"$HOSTS/$node.boot_id"
        rm -f "$HOSTS/$node.ready"
        # the holder: new namespaces, its mounts, then it waits for ever
        setsid unshare --net --uts --mount --propagation private \
            bash "$HERE/hosts.sh" _init "$node" </dev/null >"$HOSTS/$node.log" 2>&1 &
        pid=$!
        echo "$pid" >"$HOSTS/$node.pid"
        echo "holder $node $pid" >>"$HOSTS/state"
        for _ in $(seq 100); do [ -f "$HOSTS/$node.ready" ] && break; sleep 0.05; done
        [ -f "$HOSTS/$node.ready" ] || die "$node did not come up: $(cat "$HOSTS/$node.log")"
        echo "link dt${id}n$i" >>"$HOSTS/state"
        ip link add "dt${id}n$i" type veth peer name eth0 netns "$pid"
        ip link set "dt${id}n$i" master "dt${id}br" up
        addr=$net.$((10 + i))
        nsenter -t "$pid" -n -- ip addr add "$addr/24" dev eth0
        nsenter -t "$pid" -n -- ip link set eth0 up
        nsenter -t "$pid" -n -- ip link set lo up
    done
    echo "hosts.sh: node1..node$k up on $net.0/24 (bridge dt${id}br)"
}

# Runs as the holder, inside its new namespaces.
init() {
    local node=$1 cg
    hostname "$node"
    mount --bind "$HOSTS/etc-hosts" /etc/hosts
    mount --bind "$HOSTS/$node.boot_id" /proc/sys/kernel/random/boot_id
    mount -t tmpfs -o mode=1777,size=50% tmpfs /dev/shm
    # this network namespace's sysfs, keeping the machine's cgroup mounts
    cg=$(mktemp -d "$HOSTS/$node.cgroup.XXXX")
    if mountpoint -q /sys/fs/cgroup; then mount --rbind /sys/fs/cgroup "$cg"; fi
    mount -t sysfs sysfs /sys
    if mountpoint -q "$cg"; then mount --move "$cg" /sys/fs/cgroup; fi
    rmdir "$cg"
    touch "$HOSTS/$node.ready"
    exec -a "dtrain-host-$node" sleep infinity
}

# Every process in a namespace of a holder (they outlive a killed slurmd, or a job):
# TERM, then KILL after 5 s.
end_processes() {
    local pids=() p h ns
    for h in "$@"; do
        ns=$(readlink "/proc/$h/ns/net" 2>/dev/null) || continue
        for p in /proc/[0-9]*; do
            p=${p#/proc/}
            [ "$p" = "$h" ] && continue
            [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$ns" ] && pids+=("$p")
        done
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        local left=()
        for p in "${pids[@]}"; do [ -e "/proc/$p" ] && left+=("$p"); done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

down() {
    [ -f "$HOSTS/state" ] || return 0
    local holders=() kind name pid p
    while read -r kind name _; do
        if [ "$kind" = holder ]; then
            pid=$(holder_pid "$name")
            if [ -n "$pid" ]; then holders+=("$pid"); fi
        fi
    done <"$HOSTS/state"
    if [ ${#holders[@]} -gt 0 ]; then
        end_processes "${holders[@]}"
        kill -9 "${holders[@]}" 2>/dev/null || true
    fi
    # links, newest first: deleting one end of a veth deletes both, and a namespace's
    # end goes with the namespace
    while read -r kind name _; do
        if [ "$kind" = link ] && ip link show "$name" >/dev/null 2>&1 </dev/null; then
            ip link del "$name" </dev/null || true
        fi
    done < <(tac "$HOSTS/state")
    for p in "${holders[@]}"; do
        for _ in $(seq 50); do [ -e "/proc/$p" ] || break; sleep 0.1; done
    done
    rm -f "$HOSTS/state" "$HOSTS"/*.pid "$HOSTS"/*.ready
    echo "hosts.sh: namespace hosts removed"
}

case "${1:-}" in
    up) up "${2:?hosts.sh up K}" ;;
    down) down ;;
    _init) init "$2" ;;
    *) die "usage: hosts.sh up K | down  (with SLURM_ROOT set)" ;;
esac
