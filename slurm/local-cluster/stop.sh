#!/bin/bash
# Stop the Slurm cluster that start.sh started under $SLURM_ROOT.
# Cancels its jobs, then ends exactly its daemons by the pids in their pid
# files (TERM, then KILL after 10 s), plus any slurmstepd left behind by this
# instance (one holding a file under $SLURM_ROOT open) and the job processes
# under it. Then, with namespace hosts (NODES > 1), hosts.sh down ends what is
# left in their namespaces and removes the hosts, their links and the bridge
# (after the daemons: a daemon left in a namespace would keep it alive).
# Safe to run twice, and after a crash or a killed start.sh.
SLURM_ROOT=${SLURM_ROOT:-$PWD/local-slurm}
[ -d "$SLURM_ROOT" ] || { echo "stop.sh: no $SLURM_ROOT" >&2; exit 0; }
SLURM_ROOT=$(cd "$SLURM_ROOT" && pwd)
export SLURM_CONF="$SLURM_ROOT/slurm.conf"

running() {  # pid: exists and is not a zombie (an unreaped zombie passes kill -0)
    local line='' st=''
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    read -r st _ <<<"${line##*) }"
    [ "$st" != Z ]
}
alive() { [ -f "$1" ] && running "$(cat "$1")"; }
slurmd_alive() {  # one of the cluster's slurmd (slurmd.pid, or slurmd-<node>.pid per host)
    local f
    for f in "$SLURM_ROOT"/slurmd.pid "$SLURM_ROOT"/slurmd-*.pid; do alive "$f" && return 0; done
    return 1
}
# stop PID NAME ...: TERM them all at once, wait up to 10 s, then KILL the rest.
stop() {
    local pids=() names=() i
    local comm
    while [ $# -gt 0 ]; do
        comm=
        read -r comm 2>/dev/null <"/proc/$1/comm"
        # only a live process of that name: a stale pid file may name a reused pid
        [ "$comm" = "$2" ] && kill "$1" 2>/dev/null && { pids+=("$1"); names+=("$2"); }
        shift 2
    done
    for _ in $(seq 100); do
        for i in "${!pids[@]}"; do
            running "${pids[$i]}" && continue
            echo "stop.sh: stopped ${names[$i]} (${pids[$i]})"
            unset "pids[$i]"
        done
        [ ${#pids[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        kill -9 "${pids[$i]}" 2>/dev/null && echo "stop.sh: killed -9 ${names[$i]} (${pids[$i]})"
    done
}

# Cancel this cluster's jobs first, so no job step outlives the daemons.
if alive "$SLURM_ROOT/slurmctld.pid" && slurmd_alive; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 40); do   # up to 10 s for them to leave the node
            [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
fi
targets=()
for f in "$SLURM_ROOT"/slurmd-*.pid; do
    [ -f "$f" ] && targets+=("$(cat "$f")" slurmd)
done
for f in slurmd.pid:slurmd slurmctld.pid:slurmctld munge/munged.pid:munged; do
    [ -f "$SLURM_ROOT/${f%%:*}" ] && targets+=("$(cat "$SLURM_ROOT/${f%%:*}")" "${f##*:}")
done
# A slurmstepd of this instance still running (slurmd died, or a job did not
# end), and the job processes under it.
declare -A children=()
for stat in /proc/[0-9]*/stat; do
    line=
    read -r line 2>/dev/null <"$stat" || continue
    read -r _ ppid _ <<<"${line##*) }"   # fields after "pid (comm) ": state ppid ...
    pid=${stat#/proc/}
    children[$ppid]+=" ${pid%/stat}"
done
add_tree() {  # pid: it and its descendants, with their names
    local comm=
    read -r comm 2>/dev/null <"/proc/$1/comm" || return 0
    targets+=("$1" "$comm")
    local c
    for c in ${children[$1]:-}; do add_tree "$c"; done
}
for d in /proc/[0-9]*; do
    comm=
    read -r comm 2>/dev/null <"$d/comm" || continue   # builtins: no fork per process
    [ "$comm" = slurmstepd ] || continue
    running "${d#/proc/}" || continue
    # ours: started with our SLURM_CONF, or holding a file under $SLURM_ROOT
    if tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_ROOT/slurm.conf"; then
        add_tree "${d#/proc/}"
        continue
    fi
    for fd in "$d"/fd/*; do
        case "$(readlink "$fd" 2>/dev/null)" in
            "$SLURM_ROOT"/*) add_tree "${d#/proc/}"; break ;;
        esac
    done
done
[ ${#targets[@]} -gt 0 ] && stop "${targets[@]}"
rm -f "$SLURM_ROOT/slurmd.pid" "$SLURM_ROOT"/slurmd-*.pid "$SLURM_ROOT/slurmctld.pid" \
    "$SLURM_ROOT/munge/munged.pid"
if [ -f "$SLURM_ROOT/hosts/state" ]; then
    SLURM_ROOT=$SLURM_ROOT bash "$(dirname "${BASH_SOURCE[0]}")/hosts.sh" down
fi
exit 0
