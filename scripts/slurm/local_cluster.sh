#!/bin/bash
# A two-node SLURM cluster on one machine, for the tests in tests/slurm/ and for trying the
# templates (the recipe of shared/REFERENCE.md "A SLURM cluster on one machine"): munged as the
# `munge` user, slurmctld, and two slurmd daemons `n1`/`n2` on ports 17001/17002, both nodes
# resolving to 127.0.0.1.
#
#   scripts/slurm/local_cluster.sh start    # install (apt) when absent, configure, start; idempotent
#   scripts/slurm/local_cluster.sh status   # exit 0 when both nodes answer
#   scripts/slurm/local_cluster.sh stop
#
# Needs root: it installs `slurm-wlm` and `munge` with apt-get when `slurmctld` is missing, adds
# `n1`/`n2` to /etc/hosts, writes /etc/slurm/slurm.conf and starts the daemons. Not root: run it
# with sudo (`sudo scripts/slurm/local_cluster.sh start`); jobs still run as the user who submits
# them. It refuses to touch a /etc/slurm/slurm.conf that it did not write (a real cluster).
# Settings: SLURM_LOCAL_CPUS (CPUs per node, default: all of the machine's), SLURM_LOCAL_WAIT
# (seconds to wait for the nodes, default 60).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# editbench local cluster (scripts/slurm/local_cluster.sh)"
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PID=/run/slurmctld.pid
WAIT=${SLURM_LOCAL_WAIT:-60}

log() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "needs root (apt, /etc/hosts, /etc/slurm, daemons): sudo $0 $*"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

add_hosts() {
  local name
  for name in "${NODES[@]}"; do
    if ! getent hosts "$name" >/dev/null; then
      echo "127.0.0.1 $name" >>/etc/hosts
      log "added $name to /etc/hosts"
    fi
  done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  log "munged started"
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
  fi
  local host cpus i
  host=$(hostname -s)
  cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
  mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
  {
    echo "$MARKER"
    echo "ClusterName=editbench"
    echo "SlurmctldHost=${host}(127.0.0.1)"
    echo "AuthType=auth/munge"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "StateSaveLocation=/var/spool/slurmctld"
    echo "SlurmdSpoolDir=/var/spool/slurmd/%n"
    echo "SlurmctldPidFile=$CTLD_PID"
    echo "SlurmdPidFile=/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=/var/log/slurm/slurmctld.log"
    echo "SlurmdLogFile=/var/log/slurm/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "JobRequeue=1"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    echo "KillWait=10"
    echo "MinJobAge=600"
    for i in "${!NODES[@]}"; do
      echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$cpus State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF.new"
  mv "$CONF.new" "$CONF"
}

nodes_up() {
  # Both nodes answer (idle, allocated or mixed), not down/drained/not responding.
  local states
  states=$(sinfo -h -N -n "$(IFS=,; echo "${NODES[*]}")" -o '%T' 2>/dev/null) || return 1
  [[ $(grep -cE '^(idle|allocated|mixed|completing)$' <<<"$states") -eq ${#NODES[@]} ]]
}

start() {
  need_root start
  install_packages
  add_hosts
  start_munge
  write_conf
  local i
  if ! alive "$CTLD_PID"; then
    slurmctld
    log "slurmctld started"
  fi
  for i in "${!NODES[@]}"; do
    mkdir -p "/var/spool/slurmd/${NODES[$i]}"
    if ! alive "/run/slurmd-${NODES[$i]}.pid"; then
      slurmd -N "${NODES[$i]}"
      log "slurmd -N ${NODES[$i]} started (port ${PORTS[$i]})"
    fi
  done
  for ((i = 0; i < WAIT; i++)); do
    if nodes_up; then
      sinfo
      return 0
    fi
    # nodes left down by an earlier run (e.g. a killed slurmd) come back on request
    if ((i == 5)); then
      scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    fi
    sleep 1
  done
  sinfo -N -l || true
  die "the nodes did not come up within ${WAIT}s (see /var/log/slurm/)"
}

stop() {
  need_root stop
  local name pidfile
  for name in "${NODES[@]}"; do
    pidfile=/run/slurmd-$name.pid
    if alive "$pidfile"; then
      kill "$(cat "$pidfile")"
      log "slurmd $name stopped"
    fi
  done
  if alive "$CTLD_PID"; then
    kill "$(cat "$CTLD_PID")"
    log "slurmctld stopped"
  fi
  if alive /run/munge/munged.pid; then
    kill "$(cat /run/munge/munged.pid)"
    log "munged stopped"
  fi
}

status() {
  if command -v sinfo >/dev/null && nodes_up; then
    sinfo -N
    echo "local cluster: up"
    return 0
  fi
  echo "local cluster: not up"
  return 1
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
