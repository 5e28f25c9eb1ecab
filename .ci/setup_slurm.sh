#!/usr/bin/env bash
# Start a single-node Slurm (munged, slurmctld, slurmd) on this machine for the cluster tests.
#
# Debian 12 slurm-wlm 22.05 without systemd or cgroups: every daemon daemonizes and writes a
# PID file under /run. Idempotent: when `sinfo` already answers with a usable node it returns
# at once. The daemons this run starts are listed in $STATE so .ci/stop_slurm.sh stops exactly
# those (by PID) and never a Slurm that was running before.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
STATE=/run/latent-sindy-slurm.started

node_ready() { sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if command -v sinfo >/dev/null && node_ready; then
  echo "setup_slurm: Slurm already running"; sinfo; exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup_slurm: error: must run as root to install and start Slurm (uid $(id -u))" >&2; exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

host=$(hostname -s)
cpus=$(nproc)
# Leave 10% of the memory to the OS; slurmd refuses to register if RealMemory exceeds the truth.
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown -R slurm:slurm /var/lib/slurm /var/log/slurm
if ! alive /run/slurmctld.pid; then
  # Only (re)write the config when no controller is using it.
  cat > /etc/slurm/slurm.conf <<CONF
# Written by latent-sindy .ci/setup_slurm.sh: one node, no accounting, no cgroups.
ClusterName=latent-sindy-ci
SlurmctldHost=${host}
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
MinJobAge=300
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
fi

: > "$STATE.new"
if ! alive /run/munge/munged.pid; then
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    /usr/sbin/mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
  echo /run/munge/munged.pid >> "$STATE.new"
fi
munge -n | unmunge | grep -q 'STATUS: *Success' || { echo "setup_slurm: error: munge does not authenticate" >&2; exit 1; }
if ! alive /run/slurmctld.pid; then slurmctld; echo /run/slurmctld.pid >> "$STATE.new"; fi
if ! alive /run/slurmd.pid; then slurmd; echo /run/slurmd.pid >> "$STATE.new"; fi
# Append: a second setup after a partial one must not forget what the first started.
cat "$STATE.new" >> "$STATE" && rm -f "$STATE.new"

for _ in $(seq 1 120); do node_ready && break; sleep 0.5; done
if ! node_ready; then
  echo "setup_slurm: error: node not idle after 60 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
  sinfo >&2 || true; exit 1
fi
sinfo
