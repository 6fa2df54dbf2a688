#!/bin/bash
# Start a local Slurm cluster for tests and local trials: one node (localhost), or
# NODES=K namespace hosts node1..nodeK (hosts.sh: each its own network, hostname,
# /etc/hosts, /dev/shm and boot_id; one slurmd each; root needed).
#
# Every file (config, munge key and socket, state, spool, logs, pid files)
# lives under $SLURM_ROOT; nothing is written to /etc, no systemd, no cgroups.
# Client commands find this cluster through SLURM_CONF:
#     export SLURM_CONF=$SLURM_ROOT/slurm.conf
# Settings (environment):
#     SLURM_ROOT   directory for everything      (default: ./local-slurm)
#     NODES        1: one node, localhost; 2-9: namespace hosts node1..nodeK,
#                  with slurmctld and munged on this machine (default: 1)
#     NCPUS        CPUs the node declares        (default: 8, or nproc if larger;
#                  more than the real cores, so 4- or 8-rank jobs schedule on
#                  a 2-core machine: SlurmdParameters=config_overrides)
#     CTLD_PORT, SLURMD_PORT   TCP ports         (default: two free ports)
#     MEM_MB       memory the node declares      (default: MemTotal - 1 GiB)
#     CRED_EXPIRE  job credential lifetime, s    (default: 10; Slurm's is 120).
#                  It is also how long a requeued job waits before it may
#                  start again (Reason=BeginTime).
# Stop it with stop.sh (same SLURM_ROOT).
set -euo pipefail
SLURM_ROOT=${SLURM_ROOT:-$PWD/local-slurm}
mkdir -p "$SLURM_ROOT"
SLURM_ROOT=$(cd "$SLURM_ROOT" && pwd)
export SLURM_ROOT
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${NODES:-1}
if ! [[ $NODES =~ ^[1-9]$ ]]; then
    echo "start.sh: NODES: expected 1 to 9, got '$NODES'" >&2
    exit 2
fi

for exe in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sinfo; do
    [ -x "$exe" ] || { echo "start.sh: $exe missing; run install.sh first" >&2; exit 2; }
done
if [ -f "$SLURM_ROOT/slurmctld.pid" ] && kill -0 "$(cat "$SLURM_ROOT/slurmctld.pid")" 2>/dev/null; then
    echo "start.sh: a cluster is already running under $SLURM_ROOT (run stop.sh first)" >&2
    exit 1
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {  # a random port in 20000-59999 that nothing listens on
    local p
    for _ in $(seq 100); do
        p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    echo "start.sh: no free port found" >&2; return 1
}
CTLD_PORT=${CTLD_PORT:-$(free_port)}
SLURMD_PORT=${SLURMD_PORT:-$(free_port)}
while [ "$SLURMD_PORT" = "$CTLD_PORT" ]; do SLURMD_PORT=$(free_port); done
CORES=$(nproc)
NCPUS=${NCPUS:-$(( CORES > 8 ? CORES : 8 ))}
CRED_EXPIRE=${CRED_EXPIRE:-10}
# Job ids start at a random number, not 1: MPICH names its shared memory
# after the PMI job name, which under srun is "<jobid>.<step>", so two local
# clusters running job 1 at once would corrupt each other's MPI_Init.
FIRST_JOB_ID=${FIRST_JOB_ID:-$(( 1000 + (RANDOM * 32768 + RANDOM) % 60000000 ))}
MEM_MB=${MEM_MB:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))}

mkdir -p "$SLURM_ROOT"/{munge,state,spool,log}
# munged refuses a socket unless every directory above it is executable by
# all ("Socket is inaccessible"): a private parent (mode 700) cannot be used.
chmod 755 "$SLURM_ROOT" "$SLURM_ROOT/munge"
d=$SLURM_ROOT
while [ "$d" != / ]; do
    d=$(dirname "$d")
    if [ "$(( 0$(stat -c %a "$d") & 01 ))" -eq 0 ]; then
        echo "start.sh: $d is not executable by others (mode $(stat -c %a "$d")); munged needs" \
            "every directory above its socket to be. Choose another SLURM_ROOT." >&2
        exit 2
    fi
done
# munge key: 1024 random bytes, mode 0400, owned by the user running munged
if [ ! -f "$SLURM_ROOT/munge/munge.key" ]; then
    dd if=/dev/urandom of="$SLURM_ROOT/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$SLURM_ROOT/munge/munge.key"
fi
ME=$(id -un)
if [ "$NODES" -eq 1 ]; then
    CTLD_HOST=localhost
    PID_FILE=slurmd.pid LOG_FILE=slurmd.log SPOOL=spool
    NODE_LINE="NodeName=localhost NodeAddr=127.0.0.1"
    NODE_LIST=localhost
else
    # the hosts first: slurmctld must be able to reach their addresses
    bash "$HERE/hosts.sh" up "$NODES"
    NET=10.213.$(sed -n 's/^NET_ID=//p' "$SLURM_ROOT/hosts/state")
    # slurmctld runs on this machine, reached from the hosts at the bridge's address
    CTLD_HOST="$(hostname -s)($NET.1)"
    PID_FILE=slurmd-%n.pid LOG_FILE=slurmd-%n.log SPOOL=spool/%n
    addrs=$(for i in $(seq 1 "$NODES"); do printf '%s,' "$NET.$((10 + i))"; done)
    NODE_LINE="NodeName=node[1-$NODES] NodeAddr=${addrs%,}"
    NODE_LIST="node[1-$NODES]"
    # hostfiles for mpiexec without Slurm, and an ssh stand-in that knows SLURM_ROOT
    for i in $(seq 1 "$NODES"); do echo "node$i:8"; done >"$SLURM_ROOT/hostfile"
    mkdir -p "$SLURM_ROOT/bin"
    printf '#!/bin/sh\nSLURM_ROOT=%q exec %q "$@"\n' "$SLURM_ROOT" "$HERE/rsh" \
        >"$SLURM_ROOT/bin/rsh"
    chmod 755 "$SLURM_ROOT/bin/rsh"
fi
cat > "$SLURM_ROOT/slurm.conf" <<CONF
# Generated by slurm/local-cluster/start.sh: $NODES node(s), no cgroups.
ClusterName=local
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$CTLD_HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$ME
SlurmdUser=$ME
AuthType=auth/munge
AuthInfo=socket=$SLURM_ROOT/munge/munge.socket.2,cred_expire=$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/$SPOOL
SlurmctldPidFile=$SLURM_ROOT/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/$PID_FILE
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/$LOG_FILE
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at the queue every second, so a requeued job starts as soon as its
# BeginTime passes (the default is every 30 s).
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdParameters=config_overrides
$NODE_LINE CPUs=$NCPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF="$SLURM_ROOT/slurm.conf"

/usr/sbin/munged \
    --key-file="$SLURM_ROOT/munge/munge.key" --socket="$SLURM_ROOT/munge/munge.socket.2" \
    --pid-file="$SLURM_ROOT/munge/munged.pid" --log-file="$SLURM_ROOT/log/munged.log" \
    --seed-file="$SLURM_ROOT/munge/munged.seed"
/usr/sbin/slurmctld -c -f "$SLURM_CONF"      # -c: start with a clean job state
if [ "$NODES" -eq 1 ]; then
    /usr/sbin/slurmd -N localhost -f "$SLURM_CONF"
else
    for i in $(seq 1 "$NODES"); do   # each in its host's namespaces
        mkdir -p "$SLURM_ROOT/spool/node$i"
        "$HERE/on-node.sh" "node$i" /usr/sbin/slurmd -N "node$i" -f "$SLURM_CONF"
    done
fi

st=
for i in $(seq 1 60); do   # up to 30 s for every node to report idle
    st=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ "$st" = "idle " ]; then
        echo "start.sh: slurm up after ${i} polls (ports $CTLD_PORT/$SLURMD_PORT, $NODES node(s)," \
            "CPUs=$NCPUS each)"
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "start.sh: slurm did not come up; node state=$st; logs in $SLURM_ROOT/log" >&2
sinfo -N -l >&2 || true
exit 1
