#!/bin/bash
# Install the Debian packages for the local Slurm cluster (start.sh), one node or several.
# Idempotent: installs only what is missing. Needs apt-get and root (or sudo).
# libpmix-dev is not optional: Slurm's mpi/pmix plugin dlopens the unversioned
# libpmix.so, and it must be present before slurmd starts.
set -euo pipefail
PKGS=(slurmd slurmctld slurm-client munge libpmix-dev)
# namespace hosts (NODES > 1): ip and tc, unshare and nsenter, mount; iptables for
# netdelay.py (delay and loss on a host's link)
PKGS+=(iproute2 util-linux mount iptables)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install.sh: ${PKGS[*]} already installed"
    exit 0
fi
command -v apt-get >/dev/null || { echo "install.sh: apt-get not found; install ${missing[*]} by hand" >&2; exit 2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install.sh: run as root (or install sudo)" >&2; exit 2; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
echo "install.sh: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install.sh: done"
