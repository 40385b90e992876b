#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, for tests/test_slurm_real.py.
#
#   sudo bash scripts/ci/slurm.sh      # root, Debian/Ubuntu with apt-get; no systemd needed
#
# Installs Debian's slurm-wlm and munge (if missing), then starts munged, slurmctld and slurmd
# on localhost: one node named $(hostname -s) with all its CPUs, one default partition `ci`,
# jobs requeueable. Returns when `sinfo` shows the node idle. Idempotent: with the cluster
# already running it does nothing; after a reboot or a crash it starts only what is not running.
# The daemons log to /var/log/munge/munged.log and /var/log/slurm/{slurmctld,slurmd}.log.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "scripts/ci/slurm.sh: run as root (it installs packages and starts daemons)" >&2; exit 2; }
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
SLURMCTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null || true; }

if alive "$MUNGE_PID" && alive "$SLURMCTLD_PID" && alive "$SLURMD_PID" \
  && [[ "$(node_state)" =~ ^(idle|mix|alloc|comp)$ ]]; then
  echo "SLURM already running on $HOST: $(sinfo -h -o '%P %D %t')"
  exit 0
fi

if ! command -v sbatch >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "scripts/ci/slurm.sh: SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu)" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start the daemons (there is usually no init system here): a
  # policy-rc.d that denies them, unless the machine already has one.
  own_policy=false
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    own_policy=true
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
  if $own_policy; then rm -f /usr/sbin/policy-rc.d; fi
fi

# munge: slurm authenticates every message with it. The key is kept if the package made one.
install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 755 /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! alive "$MUNGE_PID"; then
  runuser -u munge -- munged --force --pid-file="$MUNGE_PID"
fi
munge -n | unmunge > /dev/null

# The node's memory, less 10% for the system (slurmd drains a node configured with more than it has).
MEMORY_MB=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
install -d -m 755 /etc/slurm /var/log/slurm /var/spool/slurmd /var/spool/slurmctld
cat > "$CONF.tmp" << EOF
# Written by scripts/ci/slurm.sh: one node on localhost for tests.
ClusterName=nested-ci
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: processes are tracked by parent id, tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
# The node's real topology may differ from CPUs= (threads, sockets): use this file's numbers.
SlurmdParameters=config_overrides
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"

alive "$SLURMCTLD_PID" || slurmctld
alive "$SLURMD_PID" || slurmd

for _ in $(seq 120); do
  state=$(node_state)
  if [ "$state" = idle ]; then
    echo "SLURM running on $HOST: $(sinfo -h -o '%P %D %t %c CPUs %m MB')"
    exit 0
  fi
  sleep 0.5
done
echo "scripts/ci/slurm.sh: node $HOST is '${state:-not reported}' after 60 s, not idle" >&2
scontrol show node "$HOST" >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
