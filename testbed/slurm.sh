#!/usr/bin/env bash
# Single-host Slurm test cluster: slurmctld + two slurmd nodes (n1, n2) on loopback.
# Usage: bash testbed/slurm.sh install|start|stop|restart-ctld|crash-node N|start-node N|status
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="$HERE/.state"
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
MUNGE_PID=/run/munge/munged.pid
NODES=(n1 n2)
APT=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
export DEBIAN_FRONTEND=noninteractive

log() { echo "[slurm.sh] $*" >&2; }

do_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  # Only refresh the package lists when there are none; stale lists can still 404 on the
  # mirror, in which case refresh once and retry.
  if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then "${APT[@]}" update; fi
  if ! "${APT[@]}" install --no-install-recommends slurm-wlm munge; then
    "${APT[@]}" update
    "${APT[@]}" install --no-install-recommends slurm-wlm munge
  fi
}

write_conf() {
  local host; host="$(hostname)"
  mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmd /var/lib/slurm/slurmctld
  cat >"$CONF" <<EOF
ClusterName=testbed
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOGDIR/slurmd-%n.log
# No cgroups in this sandbox: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Cores and memory are consumable so per-job --mem requests are honoured.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Heterogeneous jobs are only started by the backfill scheduler: run it every second.
SchedulerParameters=bf_interval=1
# Keep finished jobs visible to scontrol/squeue for a whole test session (no sacct here).
MinJobAge=3600
ReturnToService=2
InactiveLimit=0
KillWait=5
# No mail here; jobs with --mail-user/--mail-type still run (mail is dropped).
MailProg=/bin/true
# CPUs are bookkeeping only (both nodes share this host's cores): 4 per node lets a test run a
# two-replica role next to another role, or a dependency pair, without waiting for resources.
# Feature=testbed: a node feature, so that a role asking for capabilities {"testbed": True} can run.
# config_overrides: slurmd reports these values instead of the real hardware (else INVALID_REG).
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001 CPUs=4 RealMemory=4000 Feature=testbed State=UNKNOWN
NodeName=n2 NodeHostname=${host} NodeAddr=127.0.0.1 Port=17002 CPUs=4 RealMemory=4000 Feature=testbed State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

# A dead daemon lingers as a zombie for ~2 s here (init reaps late): count zombies as dead.
running() { [[ -n "$(ps -o stat= -p "$1" 2>/dev/null | grep -v '^Z')" ]]; }
alive() { [[ -f "$1" ]] && running "$(cat "$1")"; }

# Kill the daemons named in pid files and wait (bounded) for them to go away.
stop_pidfiles() {
  local f pids=() i p
  for f in "$@"; do alive "$f" && pids+=("$(cat "$f")"); done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for i in $(seq 50); do
    for p in "${pids[@]}"; do running "$p" && break; p=; done
    [[ -z "${p:-}" ]] && break; sleep 0.2
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$@"
}

start_ctld() { alive "$CTLD_PID" || slurmctld; }

wait_ping() {
  local i
  for i in $(seq 60); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
    sleep 1
  done
  log "slurmctld does not answer"; tail -n 30 "$LOGDIR/slurmctld.log" >&2 || true; return 1
}

start() {
  do_install
  write_conf
  mkdir -p /run/munge
  # munged refuses to run as root without --force.
  alive "$MUNGE_PID" || munged --force
  start_ctld
  local n
  for n in "${NODES[@]}"; do
    mkdir -p "/var/spool/slurmd/$n"
    alive "/run/slurmd-$n.pid" || slurmd -N "$n"
  done
  wait_ping
  # Existing daemons may have an older config: make them reread it (cheap if unchanged).
  scontrol reconfigure >/dev/null 2>&1 || true
  local i
  for i in $(seq 60); do
    [[ "$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u | grep -cE ' (idle|mix|alloc|comp)$')" == 2 ]] && break
    # A node drained by an earlier config (saved in StateSaveLocation) stays drained: resume it.
    for n in $(sinfo -h -N -p debug -t drain,drng,down -o '%N' 2>/dev/null | sort -u); do
      scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
    done
    if [[ $i == 60 ]]; then
      log "nodes not idle after 60 s"; sinfo -N >&2 || true
      tail -n 30 "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd-*.log >&2 || true
      exit 1
    fi
    sleep 1
  done
  mkdir -p "$STATE_DIR"
  printf 'export TORCHX_EXT_TEST_SLURM=1\nexport TORCHX_EXT_TEST_SLURM_PARTITION=debug\n' >"$STATE_DIR/slurm.env"
  sinfo -N
}

stop() {
  # The tests read this file to know the cluster is up: it goes first.
  rm -f "$STATE_DIR/slurm.env"
  # slurmd lingers ~10 s on SIGTERM when slurmctld is already gone: stop the nodes first.
  stop_pidfiles /run/slurmd-n1.pid /run/slurmd-n2.pid
  stop_pidfiles "$CTLD_PID"
  stop_pidfiles "$MUNGE_PID"
}

restart_ctld() {
  stop_pidfiles "$CTLD_PID"
  start_ctld
  wait_ping
}

# A node's slurmd crashes (SIGKILL: no goodbye to slurmctld); its job steps keep running.
crash_node() {
  local f="/run/slurmd-$1.pid"
  alive "$f" || { log "slurmd of $1 is not running"; return 1; }
  kill -9 "$(cat "$f")"
  local i
  for i in $(seq 50); do alive "$f" || break; sleep 0.1; done
  rm -f "$f"
}

# The node's slurmd comes back and re-registers (its running steps are found again).
start_node() {
  alive "/run/slurmd-$1.pid" || slurmd -N "$1"
  local i
  for i in $(seq 60); do
    [[ "$(sinfo -h -n "$1" -o '%t' 2>/dev/null)" =~ ^(idle|mix|alloc|comp)$ ]] && return 0
    sleep 0.5
  done
  log "node $1 did not come back"; sinfo -N >&2 || true; return 1
}

case "${1:-}" in
  install) do_install ;;
  start) start ;;
  stop) stop ;;
  restart-ctld) restart_ctld ;;
  crash-node) crash_node "${2:?node name}" ;;
  start-node) start_node "${2:?node name}" ;;
  status) timeout 5 sinfo >/dev/null 2>&1 ;;
  *) echo "usage: $0 install|start|stop|restart-ctld|crash-node N|start-node N|status" >&2; exit 2 ;;
esac
