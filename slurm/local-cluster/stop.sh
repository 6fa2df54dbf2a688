#!/bin/bash
# Stop the one-node Slurm cluster that start.sh started under $SLURM_ROOT.
# Cancels its jobs, then ends exactly its daemons by the pids in their pid
# files (TERM, then KILL after 10 s), plus any slurmstepd left behind by this
# instance (one holding a file under $SLURM_ROOT open). Safe to run twice.
SLURM_ROOT=${SLURM_ROOT:-$PWD/local-slurm}
[ -d "$SLURM_ROOT" ] || { echo "stop.sh: no $SLURM_ROOT" >&2; exit 0; }
SLURM_ROOT=$(cd "$SLURM_ROOT" && pwd)
export SLURM_CONF="$SLURM_ROOT/slurm.conf"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() {  # pid name: TERM, wait up to 10 s, then KILL
    local pid=$1 name=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || { echo "stop.sh: stopped $name ($pid)"; return 0; }
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null && echo "stop.sh: killed -9 $name ($pid)"
}

# Cancel this cluster's jobs first, so no job step outlives the daemons.
if alive "$SLURM_ROOT/slurmctld.pid"; then
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
[ -f "$SLURM_ROOT/slurmd.pid" ] && stop_pid "$(cat "$SLURM_ROOT/slurmd.pid")" slurmd
for d in /proc/[0-9]*; do   # orphaned slurmstepd of this instance
    [ "$(readlink "$d/exe" 2>/dev/null)" = /usr/sbin/slurmstepd ] || continue
    ls -l "$d/fd" 2>/dev/null | grep -q "$SLURM_ROOT" && stop_pid "${d#/proc/}" slurmstepd
done
[ -f "$SLURM_ROOT/slurmctld.pid" ] && stop_pid "$(cat "$SLURM_ROOT/slurmctld.pid")" slurmctld
[ -f "$SLURM_ROOT/munge/munged.pid" ] && stop_pid "$(cat "$SLURM_ROOT/munge/munged.pid")" munged
rm -f "$SLURM_ROOT/slurmd.pid" "$SLURM_ROOT/slurmctld.pid" "$SLURM_ROOT/munge/munged.pid"
exit 0
