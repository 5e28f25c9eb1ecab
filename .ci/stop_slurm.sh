#!/usr/bin/env bash
# Stop the Slurm daemons that .ci/setup_slurm.sh started, by PID, newest first (slurmd before
# slurmctld before munged). Daemons it did not start are left alone.
set -uo pipefail
STATE=/run/latent-sindy-slurm.started
[ -s "$STATE" ] || { echo "stop_slurm: nothing started by setup_slurm.sh"; exit 0; }

stop_pidfile() {
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { echo "stop_slurm: stopped $f ($pid)"; return 0; }; sleep 0.1; done
  echo "stop_slurm: $f ($pid) still alive after 10 s" >&2
  return 1
}

rc=0
for f in $(tac "$STATE"); do stop_pidfile "$f" || rc=1; done
rm -f "$STATE"
exit $rc
