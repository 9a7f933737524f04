#!/usr/bin/env bash
# slurm/testing/stop.sh - stop what start.sh started, by the pids it recorded (never by name).
#   stop.sh          cancel the jobs, stop the daemons; state is kept (jobs and accounting survive a restart)
#   stop.sh --purge  also delete state, spool, logs, pid files and the MariaDB data
# Packages and /etc/slurm/*.conf stay.
set -uo pipefail
DIR=${KILN_SLURM_DIR:-/tmp/kiln-slurm}

# stop PIDFILE COMM: TERM the pid when it is alive and really COMM, wait up to 20 s, then KILL
stop() {
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
      [ -d "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || break
      sleep 0.2
    done
    if [ -d "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
      echo "[kiln-slurm] $comm ($pid) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null
    fi
    echo "[kiln-slurm] stopped $comm ($pid)"
  fi
  rm -f "$f"
}

if [ -s "$DIR/run/slurmctld.pid" ] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel --full $jobs 2>/dev/null
    for _ in $(seq 75); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    echo "[kiln-slurm] jobs cancelled; left: $(squeue -h -o %i 2>/dev/null | wc -l)"
  fi
fi
stop "$DIR/run/slurmd.pid" slurmd
stop "$DIR/run/slurmctld.pid" slurmctld
stop "$DIR/run/slurmdbd.pid" slurmdbd
stop "$DIR/db/mysqld.pid" mariadbd
stop "$DIR/run/munged.pid" munged   # present only when start.sh started munged
if [ "${1:-}" = --purge ]; then
  rm -rf "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/db"
  echo "[kiln-slurm] purged $DIR"
fi
