#!/usr/bin/env bash
# A second Slurm cluster whose nodes have their own addresses (testbed/netns.sh; layout in
# testbed/README.md): slurmctld in namespace txe-sc (198.18.0.20), slurmd of n1 in txe-sn1
# (198.18.0.21) and of n2 in txe-sn2 (198.18.0.22), each node's NodeAddr its address, and a login
# node (sshd, user txemn) in txe-sl (198.18.0.30) for remote mode. It has its
# own slurm.conf (testbed/.state/slurm_multinode/slurm.conf: clients need SLURM_CONF=that), state
# directories and pid files, so it runs beside testbed/slurm.sh's cluster; munge is shared.
#   bash testbed/slurm_multinode.sh start|stop|status
#   bash testbed/slurm_multinode.sh kill-node n1|n2    SIGKILL everything in the node's namespace
#   bash testbed/slurm_multinode.sh start-node n1|n2   slurmd back (idempotent), node resumed
# Writes testbed/.state/slurm_multinode.env (TORCHX_EXT_TEST_SLURMMN_*; not SLURM_CONF itself,
# which would move the single-node tests onto this cluster).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NETNS="$ROOT/testbed/netns.sh"
STATE="$ROOT/testbed/.state"
DIR="$STATE/slurm_multinode"
export SLURM_CONF="$DIR/slurm.conf"
ENV_FILE="$STATE/slurm_multinode.env"
RUN=/run/txe-slurm LOGDIR=/var/log/txe-slurm SPOOL=/var/spool/txe-slurm CTLD_STATE=/var/lib/txe-slurm
CTLD_NS=txe-sc CTLD_IP=198.18.0.20
declare -A NS=([n1]=txe-sn1 [n2]=txe-sn2)
declare -A IP=([n1]=198.18.0.21 [n2]=198.18.0.22)
PARTITION=mn
# The login node of remote Slurm: sshd in its own namespace, user txemn (key only), whose sessions
# get SLURM_CONF from its authorized_keys entry (the system slurm.conf is the single-node cluster's).
LOGIN_NS=txe-sl LOGIN_IP=198.18.0.30 LOGIN_USER=txemn LOGIN_ALIAS=txe-mnlogin
SSH_DIR="$DIR/ssh"

log() { echo "[slurm_multinode.sh] $*" >&2; }

write_conf() {
  local host; host="$(hostname)"
  mkdir -p "$DIR" "$RUN" "$LOGDIR" "$SPOOL" "$CTLD_STATE"
  cat >"$SLURM_CONF" <<EOF
ClusterName=txemn
# The controller's name must be this host's name (namespaces share it); its address is its own.
SlurmctldHost=${host}(${CTLD_IP})
SlurmctldPort=26817
SlurmdPort=26818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$CTLD_STATE
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdSpoolDir=$SPOOL/%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOGDIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerParameters=bf_interval=1
MinJobAge=3600
# Job ids apart from the single-node cluster's (app ids are job ids: one test session sees both).
FirstJobId=700000
ReturnToService=2
InactiveLimit=0
KillWait=5
# A lost node is declared DOWN (and its jobs' fate decided) after 10 s, not the default 300 s.
SlurmdTimeout=10
MailProg=/bin/true
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=${host} NodeAddr=${IP[n1]} CPUs=4 RealMemory=4000 Feature=testbed State=UNKNOWN
NodeName=n2 NodeHostname=${host} NodeAddr=${IP[n2]} CPUs=4 RealMemory=4000 Feature=testbed State=UNKNOWN
PartitionName=$PARTITION Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [[ -n "$(ps -o stat= -p "$1" 2>/dev/null | grep -v '^Z')" ]]; }
alive() { [[ -f "$1" ]] && running "$(cat "$1")"; }

# slurmd remounts /sys under `ip netns exec` and fails; nsenter --net keeps the mounts.
in_ns() { local ns="$1"; shift; nsenter --net="/run/netns/$ns" "$@"; }

start_node() {
  bash "$NETNS" add "${NS[$1]}" "${IP[$1]}"
  mkdir -p "$SPOOL/$1"
  alive "$RUN/slurmd-$1.pid" || in_ns "${NS[$1]}" slurmd -N "$1"
}

nodes_ready() {  # $@: nodes that must be idle/mix/alloc
  local n st
  for n in "$@"; do
    st="$(sinfo -h -n "$n" -o '%t' 2>/dev/null | head -1)"
    [[ "$st" =~ ^(idle|mix|alloc|comp)$ ]] || return 1
  done
}

wait_nodes() {
  local i n
  for i in $(seq 60); do
    nodes_ready "$@" && return 0
    # a node drained/down by an earlier loss stays so: resume it
    for n in "$@"; do
      [[ "$(sinfo -h -n "$n" -o '%t' 2>/dev/null | head -1)" =~ ^(down|drain|drng|fail)\*?$ ]] &&
        scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
    done
    sleep 1
  done
  log "nodes $* not ready after 60 s"; sinfo -N >&2 || true
  tail -n 20 "$LOGDIR"/slurmctld.log >&2 || true; return 1
}

start_login() {
  command -v /usr/sbin/sshd >/dev/null || { log "no sshd: bash testbed/sshd.sh install"; return 1; }
  mkdir -p "$SSH_DIR" /run/sshd
  [[ -f "$SSH_DIR/host_key" ]] || ssh-keygen -q -t ed25519 -N "" -f "$SSH_DIR/host_key"
  [[ -f "$SSH_DIR/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -f "$SSH_DIR/id_ed25519"
  id "$LOGIN_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$LOGIN_USER"
  local home; home="$(getent passwd "$LOGIN_USER" | cut -d: -f6)"
  install -d -m 700 -o "$LOGIN_USER" -g "$LOGIN_USER" "$home/.ssh"
  printf 'environment="SLURM_CONF=%s" %s\n' "$SLURM_CONF" "$(cat "$SSH_DIR/id_ed25519.pub")" >"$home/.ssh/authorized_keys"
  chown "$LOGIN_USER:$LOGIN_USER" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"
  echo "$LOGIN_IP $(cut -d' ' -f1,2 "$SSH_DIR/host_key.pub")" >"$SSH_DIR/known_hosts"
  cat >"$SSH_DIR/config" <<EOF
Host $LOGIN_ALIAS
  HostName $LOGIN_IP
  User $LOGIN_USER
  IdentityFile $SSH_DIR/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $SSH_DIR/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
EOF
  bash "$NETNS" add "$LOGIN_NS" "$LOGIN_IP"
  alive "$RUN/sshd.pid" || in_ns "$LOGIN_NS" /usr/sbin/sshd -p 22 -o ListenAddress="$LOGIN_IP" \
    -h "$SSH_DIR/host_key" -o PidFile="$RUN/sshd.pid" -o PasswordAuthentication=no \
    -o KbdInteractiveAuthentication=no -o PubkeyAuthentication=yes -o AllowUsers="$LOGIN_USER" \
    -o PermitUserEnvironment=SLURM_CONF -E "$LOGDIR/sshd.log"
  local i
  for i in $(seq 50); do
    ssh -F "$SSH_DIR/config" "$LOGIN_ALIAS" -- sinfo -h -o %P 2>/dev/null | grep -q "^$PARTITION" && return 0
    sleep 0.2
  done
  log "the login node $LOGIN_IP does not answer over SSH"; tail -n 20 "$LOGDIR/sshd.log" >&2 || true; return 1
}

start() {
  command -v slurmctld >/dev/null || { log "Slurm is not installed: bash testbed/slurm.sh install"; exit 1; }
  write_conf
  mkdir -p /run/munge
  alive /run/munge/munged.pid || munged --force
  bash "$NETNS" add "$CTLD_NS" "$CTLD_IP"
  alive "$RUN/slurmctld.pid" || in_ns "$CTLD_NS" slurmctld
  local i
  for i in $(seq 60); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    [[ $i == 60 ]] && { log "slurmctld does not answer"; tail -n 30 "$LOGDIR/slurmctld.log" >&2; exit 1; }
    sleep 0.5
  done
  start_node n1
  start_node n2
  wait_nodes n1 n2
  start_login
  cat >"$ENV_FILE" <<EOF
export TORCHX_EXT_TEST_SLURMMN_CONF=$SLURM_CONF
export TORCHX_EXT_TEST_SLURMMN_PARTITION=$PARTITION
export TORCHX_EXT_TEST_SLURMMN_NODES=n1=${NS[n1]}=${IP[n1]},n2=${NS[n2]}=${IP[n2]}
export TORCHX_EXT_TEST_SLURMMN_SCRIPT=$ROOT/testbed/slurm_multinode.sh
export TORCHX_EXT_TEST_SLURMMN_SSH_CONFIG=$SSH_DIR/config
export TORCHX_EXT_TEST_SLURMMN_SSH_HOST=$LOGIN_ALIAS
EOF
  cat "$ENV_FILE"
}

stop() {
  rm -f "$ENV_FILE"
  local ns
  for ns in "$LOGIN_NS" "${NS[n1]}" "${NS[n2]}" "$CTLD_NS"; do bash "$NETNS" del "$ns"; done
  bash "$NETNS" gc
  rm -rf "$RUN" "$SPOOL" "$CTLD_STATE" "$DIR"
  echo "slurm multinode cluster stopped"
}

node_arg() { [[ "${1:-}" == n1 || "${1:-}" == n2 ]] || { log "node: n1 or n2"; exit 2; }; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) [[ -f "$SLURM_CONF" ]] && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' ;;
  kill-node) node_arg "${2:-}"; bash "$NETNS" kill "${NS[$2]}"; rm -f "$RUN/slurmd-$2.pid" ;;
  start-node) node_arg "${2:-}"; start_node "$2"; wait_nodes "$2" ;;
  *) echo "usage: $0 start|stop|status|kill-node N|start-node N" >&2; exit 2 ;;
esac
