#!/usr/bin/env bash
# slurm/testing/start.sh - a real single-node Slurm 22.05 for Kiln's tests, started by hand (no systemd, no
# docker): install the Debian packages when missing, write slurm.conf, start munged, MariaDB + slurmdbd
# (accounting: submitit and `sacct` need it), slurmctld and slurmd, and wait until the node is idle.
# Idempotent: re-running it while everything is up changes nothing. Stop it with stop.sh (by recorded pids).
#
#   start.sh                 install if needed, configure, start
#   start.sh --install-only  only install the packages (CI does this up front)
#
# Env knobs:
#   KILN_SLURM_DIR     state/log/pid directory                 (default /tmp/kiln-slurm)
#   KILN_SLURM_DBD     1 = slurmdbd + MariaDB, 0 = none        (default 1)
#   KILN_SLURM_CPUS    CPUs of node "localhost"                (default: nproc)
# Needs root and apt-get (Debian 12: Slurm 22.05.8). Ports: 6817-6819 and MariaDB on 127.0.0.1:3306, so one
# such cluster per machine. Measured on the project's machine kind: /work/shared/reference/SLURM-LOCAL.md.
set -euo pipefail

DIR=${KILN_SLURM_DIR:-/tmp/kiln-slurm}
WITH_DBD=${KILN_SLURM_DBD:-1}
CPUS=${KILN_SLURM_CPUS:-$(nproc)}
DB_PORT=3306
DB_PASS=kilnslurm
T0=$(date +%s)

log() { echo "[kiln-slurm +$(( $(date +%s) - T0 ))s] $*"; }
die() { log "ERROR: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (daemons, /etc/slurm, apt-get)"

# alive PIDFILE COMM: the pid in PIDFILE runs and is COMM (not a recycled pid)
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}
# wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
wait_for() {
  local end=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out waiting for $what (logs: $DIR/log)"
    sleep 0.2
  done
  log "$what: up"
}

# ------------------------------------------------------------------------------------------------ install
PKGS=(slurmctld slurmd slurm-client munge)
[ "$WITH_DBD" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "apt-get not found: cannot install ${missing[*]}"
  mkdir -p "$DIR/log"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd, postinst scripts would start munge/mariadb/slurm through init.d: a policy-rc.d that
  # exits 101 forbids it for the install (left alone when the image already has one).
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1
  fi
  rc=0
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$DIR/log/apt.log" 2>&1 || rc=$?
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || { tail -20 "$DIR/log/apt.log" >&2; die "apt-get install failed"; }
  log "installed"
fi
[ "${1:-}" = --install-only ] && exit 0
mkdir -p "$DIR"/{state,spool,log,run}
chmod 755 "$DIR"   # mariadbd runs as mysql and must traverse it

# ------------------------------------------------------------------------------------------------ config
if [ "$WITH_DBD" = 1 ]; then
  ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
else
  ACCT=AccountingStorageType=accounting_storage/none
fi
mkdir -p /etc/slurm
CONF=$(cat <<EOF
# written by Kiln's slurm/testing/start.sh
ClusterName=kiln
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
SchedulerType=sched/backfill
# pick up new, requeued and newly eligible jobs within seconds (defaults 30 s and 60 s)
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$CONF" ]; then
  printf '%s\n' "$CONF" >/etc/slurm/slurm.conf
  log "wrote /etc/slurm/slurm.conf"
  alive "$DIR/run/slurmctld.pid" slurmctld && die "slurm.conf changed while slurmctld runs: run stop.sh, then start.sh"
fi
if [ "$WITH_DBD" = 1 ]; then
  cat >/etc/slurm/slurmdbd.conf <<EOF
# written by Kiln's slurm/testing/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=kiln_slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a world-readable one
fi

# ------------------------------------------------------------------------------------------------ munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged: already up"
else
  # munged refuses to run as root; /run/munge is what systemd would have made.
  install -d -o munge -g munge -m 0755 /run/munge
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged
  wait_for 20 munged bash -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$DIR/run/munged.pid"   # marks it as ours for stop.sh
fi

# ------------------------------------------------------------------------------------- mariadb + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  DB=$DIR/db
  if alive "$DB/mysqld.pid" mariadbd; then
    log "mariadbd: already up"
  else
    install -d -o mysql -g mysql "$DB" "$DB/data"
    if [ ! -d "$DB/data/mysql" ]; then
      mariadb-install-db --user=mysql --datadir="$DB/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
    fi
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mysqld.sock" \
      --pid-file="$DB/mysqld.pid" --log-error="$DIR/log/mariadb.err" --bind-address=127.0.0.1 \
      --port=$DB_PORT --innodb-buffer-pool-size=64M --innodb-log-file-size=16M </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd mariadb-admin --socket="$DB/mysqld.sock" ping
  fi
  mariadb --socket="$DB/mysqld.sock" -u root -e "
    CREATE DATABASE IF NOT EXISTS kiln_slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON kiln_slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON kiln_slurm_acct_db.* TO 'slurm'@'localhost';"
  if alive "$DIR/run/slurmdbd.pid" slurmdbd; then
    log "slurmdbd: already up"
  else
    slurmdbd   # daemonizes and writes its PidFile
    wait_for 60 slurmdbd sacctmgr -n list cluster
  fi
fi

# ------------------------------------------------------------------------------------ slurmctld + slurmd
if alive "$DIR/run/slurmctld.pid" slurmctld; then
  log "slurmctld: already up"
else
  slurmctld
  wait_for 60 slurmctld bash -c 'scontrol ping | grep -q "is UP"'
fi
if alive "$DIR/run/slurmd.pid" slurmd; then
  log "slurmd: already up"
else
  slurmd -N localhost   # the node is "localhost" whatever `hostname` says
fi
wait_for 60 "node localhost" bash -c 'sinfo -h -n localhost -o %t | grep -qxE "idle|mix|alloc"'
log "Slurm up: $(sinfo -h -o '%P %D %t %c CPUs')"
