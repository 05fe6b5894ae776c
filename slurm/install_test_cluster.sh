#!/usr/bin/env bash
# Install what the test suite's throw-away Slurm cluster needs (tests/slurm_cluster.py): Debian's
# Slurm daemons and clients, and munge. Only the packages: no service is configured or started
# here; the tests write their own slurm.conf into a temporary directory and start the daemons
# themselves.
#
#   sudo slurm/install_test_cluster.sh        # exits 0 at once when everything is there
#
# Exit codes: 0 installed (or already there), 2 cannot install here (not root, no apt-get),
# 1 apt-get failed. The tests skip with this script's output on 2 and 1.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
needed=(slurmctld slurmd sbatch srun scontrol sinfo munged mungekey)

missing=0
for cmd in "${needed[@]}"; do
    # slurmctld, slurmd and munged live in /usr/sbin, which a non-login PATH may lack.
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1; then missing=1; fi
done
if [ "$missing" = 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install ${packages[*]}: no apt-get on this machine (the tests expect Debian/Ubuntu)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "cannot install ${packages[*]}: apt-get needs root (run: sudo $0)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# Wait for a concurrent apt/dpkg run instead of failing on its lock.
apt_opts=(-o DPkg::Lock::Timeout=300 -y --no-install-recommends)
# A fresh machine may have no package lists yet: update only when the install cannot find them.
if ! apt-get install "${apt_opts[@]}" "${packages[@]}"; then
    apt-get -o DPkg::Lock::Timeout=300 update
    apt-get install "${apt_opts[@]}" "${packages[@]}"
fi
