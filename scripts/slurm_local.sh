#!/usr/bin/env bash
# A one-node SLURM on this machine (a laptop, a CI runner, a container without systemd), to try
# `hydra/launcher=slurm` and to run the `slurm` tests against a real scheduler.
#
#   scripts/slurm_local.sh start    # installs slurm-wlm + munge with apt if missing (root), writes the config for
#                                   # this machine's cores and memory, starts munged, slurmctld and slurmd
#   eval "$(scripts/slurm_local.sh env)"   # or copy the `export SLURM_CONF=...` line `start` prints
#   scripts/slurm_local.sh status   # exit 0 only when the node is up (idle, or running jobs)
#   scripts/slurm_local.sh stop     # stops the daemons it started (by their pid files), nothing else
#
# Everything lives under KT_SLURM_DIR (default /tmp/kt-slurm): config, munge key and socket, state, spool, logs,
# pid files. Ports: KT_SLURM_PORT (slurmctld, default 6817) and KT_SLURM_PORT+1 (slurmd).
# Partitions: `low` (default; PreemptMode=REQUEUE, GraceTime=KT_SLURM_GRACE s, default 30) and `high`
# (PreemptMode=OFF, higher PriorityTier): a `high` job that needs the cores of a running `low` job preempts it;
# the victim first gets its --signal (submitit's USR2, SlurmctldParameters=preempt_send_user_signal) and is
# requeued. AuthInfo=cred_expire=10 makes a requeued job eligible again ~11 s later (Slurm's default: 120 s);
# the scheduler runs every 2 s (sched_interval, bf_interval; defaults 60 s and 30 s) so it starts then.
# `start` on a stopped cluster begins with an empty job state (job ids restart at 1).
set -euo pipefail

DIR="${KT_SLURM_DIR:-/tmp/kt-slurm}"
PORT="${KT_SLURM_PORT:-6817}"
GRACE="${KT_SLURM_GRACE:-30}"
NODE=kt-node
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"

die() { echo "error: $*" >&2; exit 1; }

pid_alive() {  # pid file -> 0 when its process runs and is the daemon named $2
  local f="$1" name="$2" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sinfo >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and this is not root: run as root, or apt-get install slurm-wlm munge"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get: install Slurm and MUNGE with your package manager"
  echo "installing slurm-wlm and munge with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

write_config() {
  local cpus mem_mb
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # nproc obeys OMP_NUM_THREADS
  mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
  mem_mb=$(( mem_mb > 2048 ? mem_mb - 1024 : mem_mb ))  # leave the OS some memory
  cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh for this machine ($cpus cores, $mem_mb MB for jobs)
ClusterName=kt-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=low Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

node_state() { SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

node_up() {  # responding and usable: idle, or running jobs (sinfo marks a node that does not respond with *)
  case "$(node_state)" in
    idle|mixed|allocated|completing) return 0 ;;
    *) return 1 ;;
  esac
}

start() {
  install_packages
  if pid_alive "$DIR/run/munged.pid" munged && pid_alive "$DIR/run/slurmctld.pid" slurmctld \
      && pid_alive "$DIR/run/slurmd.pid" slurmd && node_up; then
    echo "local SLURM already running ($DIR)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  mkdir -p "$DIR"/{munge,state,spool,run,log}
  chmod 700 "$DIR/munge"
  if ! pid_alive "$DIR/run/slurmctld.pid" slurmctld; then  # a fresh cluster: empty job state
    rm -rf "${DIR:?}/state" "${DIR:?}/spool" && mkdir -p "$DIR/state" "$DIR/spool"
  fi
  write_config
  if ! pid_alive "$DIR/run/munged.pid" munged; then
    [ -f "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$DIR/munge/munge.key"; }
    chmod 400 "$DIR/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
      --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
      || die "munged did not start: see $DIR/log/munged.log"
  fi
  if ! pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
    slurmctld -f "$CONF" || die "slurmctld did not start: see $DIR/log/slurmctld.log"
  fi
  if ! pid_alive "$DIR/run/slurmd.pid" slurmd; then
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start: see $DIR/log/slurmd.log"
  fi
  local t=0
  until node_up; do
    sleep 0.5; t=$((t + 1))
    if [ "$t" = 20 ]; then  # a node left down by an earlier run: bring it back
      SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    fi
    [ "$t" -lt 120 ] || die "the node is not up after 60 s (state: $(node_state || true)): see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
  done
  echo "local SLURM up ($(sed -n "s/^NodeName.* CPUs=\([0-9]*\) .*/\1/p" "$CONF") cores, node $NODE, partitions low (default, preemptible) and high; $DIR)"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local name f pid i
  for name in slurmd slurmctld munged; do
    f="$DIR/run/$name.pid"
    if pid_alive "$f" "$name"; then
      pid="$(cat "$f")"
      kill "$pid" 2>/dev/null || true
      for i in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      if [ -d "/proc/$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$f"
  done
  echo "local SLURM stopped ($DIR)"
}

status() {
  local name ok=0
  for name in munged slurmctld slurmd; do
    if pid_alive "$DIR/run/$name.pid" "$name"; then echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
    else echo "$name: not running"; ok=1; fi
  done
  if [ "$ok" = 0 ] && node_up; then
    echo "node $NODE: $(node_state)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  echo "node $NODE: $(node_state || true) (not up)"
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state in KT_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
