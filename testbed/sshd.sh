#!/usr/bin/env bash
# A real sshd on 127.0.0.1 for slurm_jobs' remote (SSH) mode: key authentication only, one
# non-root user (txe) whose login shell finds the Slurm commands, and a client config with a
# `Host txe-login` alias so tests connect exactly as a user with a working `ssh login` would.
# A second alias, `txe-noslurm`, logs in as the same user with a second key whose authorized_keys
# entry forces a PATH without Slurm's commands: a login node where `sbatch` is "command not found".
# Usage: bash testbed/sshd.sh install|start|stop|status
#   SSHD_PORT=N  preferred port (default 2222; the next free one is taken if it is busy)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="$HERE/.state"
SSH_DIR="$STATE_DIR/ssh"
HOST_KEY="$SSH_DIR/ssh_host_ed25519_key"
CLIENT_KEY="$SSH_DIR/id_ed25519"
NOSLURM_KEY="$SSH_DIR/id_ed25519_noslurm"
# every command of /usr/bin and /usr/local/bin but Slurm's (readable by the test user)
NOSLURM_BIN=/usr/local/lib/torchx-ext-testbed/noslurm-bin
SLURM_COMMANDS="sbatch squeue scontrol scancel sacct srun salloc sinfo sstat sattach sprio sshare sdiag strigger sreport sacctmgr sbcast"
PID_FILE="$SSH_DIR/sshd.pid"
PORT_FILE="$SSH_DIR/port"
CLIENT_CONFIG="$SSH_DIR/config"
KNOWN_HOSTS="$SSH_DIR/known_hosts"
ENV_FILE="$STATE_DIR/sshd.env"
LOG_FILE="$SSH_DIR/sshd.log"
TEST_USER=txe
HOST_ALIAS=txe-login
NOSLURM_ALIAS=txe-noslurm
APT=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
export DEBIAN_FRONTEND=noninteractive
# needrestart (pulled in by openssh-server here) prints pages of noise after every install.
export NEEDRESTART_SUSPEND=1

log() { echo "[sshd.sh] $*" >&2; }

do_install() {
  local missing=()
  [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
  command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  command -v rsync >/dev/null || missing+=(rsync)
  [[ ${#missing[@]} == 0 ]] && return 0
  log "installing ${missing[*]}"
  # Only refresh the package lists when there are none; stale lists can still 404 on the
  # mirror, in which case refresh once and retry.
  if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then "${APT[@]}" update; fi
  if ! "${APT[@]}" install --no-install-recommends "${missing[@]}"; then
    "${APT[@]}" update
    "${APT[@]}" install --no-install-recommends "${missing[@]}"
  fi
}

# A dead daemon lingers as a zombie for ~2 s here (init reaps late): count zombies as dead.
running() { [[ -n "$(ps -o stat= -p "$1" 2>/dev/null | grep -v '^Z')" ]]; }
alive() { [[ -f "$1" ]] && running "$(cat "$1")"; }

# Something (any process) accepts TCP connections on 127.0.0.1:$1.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  local p
  for p in $(seq "${SSHD_PORT:-2222}" $(( ${SSHD_PORT:-2222} + 100 ))); do
    listening "$p" || { echo "$p"; return 0; }
  done
  log "no free port from ${SSHD_PORT:-2222}"; return 1
}

make_keys() {
  mkdir -p "$SSH_DIR"; chmod 700 "$SSH_DIR"
  # Generated once: the known_hosts of earlier runs (and a user's master connections) stay valid.
  [[ -f "$HOST_KEY" ]] || ssh-keygen -q -t ed25519 -N "" -C "txe-testbed-host" -f "$HOST_KEY"
  [[ -f "$CLIENT_KEY" ]] || ssh-keygen -q -t ed25519 -N "" -C "txe-testbed-client" -f "$CLIENT_KEY"
  [[ -f "$NOSLURM_KEY" ]] || ssh-keygen -q -t ed25519 -N "" -C "txe-testbed-noslurm" -f "$NOSLURM_KEY"
  chmod 600 "$HOST_KEY" "$CLIENT_KEY" "$NOSLURM_KEY"
}

make_user() {
  id "$TEST_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$TEST_USER"
  local home; home="$(getent passwd "$TEST_USER" | cut -d: -f6)"
  # sshd's StrictModes refuses keys in a group/world-writable ~/.ssh or home.
  install -d -m 700 -o "$TEST_USER" -g "$TEST_USER" "$home/.ssh"
  # appended, not replaced: another checkout's testbed (a CI clone beside this one) keeps its key
  local keys="$home/.ssh/authorized_keys"
  [[ -f "$keys" ]] || install -m 600 -o "$TEST_USER" -g "$TEST_USER" /dev/null "$keys"
  grep -qxF "$(cat "$CLIENT_KEY.pub")" "$keys" || cat "$CLIENT_KEY.pub" >>"$keys"
  # the no-Slurm login: same user, its own key, a forced PATH without Slurm's commands
  rm -rf "$NOSLURM_BIN.new"; mkdir -p "$NOSLURM_BIN.new"
  local f
  for f in /usr/local/bin/* /usr/bin/*; do
    [[ " $SLURM_COMMANDS " == *" $(basename "$f") "* ]] || ln -sf "$f" "$NOSLURM_BIN.new/"
  done
  rm -rf "$NOSLURM_BIN"; mv "$NOSLURM_BIN.new" "$NOSLURM_BIN"
  local noslurm_line
  noslurm_line="command=\"export PATH=$NOSLURM_BIN; eval \\\"\$SSH_ORIGINAL_COMMAND\\\"\" $(cat "$NOSLURM_KEY.pub")"
  grep -qxF "$noslurm_line" "$keys" || echo "$noslurm_line" >>"$keys"
  chown "$TEST_USER:$TEST_USER" "$keys"; chmod 600 "$keys"
  chmod go-w "$home"
}

write_client_config() {
  local port="$1"
  # The host's key is known up front (we made it): strict checking from the very first login.
  printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$HOST_KEY.pub")" >"$KNOWN_HOSTS"
  printf '[localhost]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$HOST_KEY.pub")" >>"$KNOWN_HOSTS"
  cat >"$CLIENT_CONFIG" <<EOF
Host $HOST_ALIAS
  HostName 127.0.0.1
  Port $port
  User $TEST_USER
  IdentityFile $CLIENT_KEY
  IdentitiesOnly yes
  UserKnownHostsFile $KNOWN_HOSTS
  StrictHostKeyChecking yes
  BatchMode yes

# the same user without Slurm on PATH; "localhost", so that ssh's ControlPath hash (%C) differs
Host $NOSLURM_ALIAS
  HostName localhost
  AddressFamily inet
  Port $port
  User $TEST_USER
  IdentityFile $NOSLURM_KEY
  IdentitiesOnly yes
  UserKnownHostsFile $KNOWN_HOSTS
  StrictHostKeyChecking yes
  BatchMode yes
EOF
  chmod 600 "$CLIENT_CONFIG"
}

start() {
  do_install
  make_keys
  make_user
  local port
  if alive "$PID_FILE" && [[ -f "$PORT_FILE" ]]; then
    port="$(cat "$PORT_FILE")"
  else
    rm -f "$PID_FILE"
    port="$(free_port)"
    mkdir -p /run/sshd   # privilege separation directory; sshd refuses to start without it
    # The system sshd_config applies (Debian: UsePAM yes, which also lets a user without a password
    # log in by key); the options below pin what this testbed relies on. -E: no syslog here.
    if ! /usr/sbin/sshd -p "$port" -o ListenAddress=127.0.0.1 -h "$HOST_KEY" -o PidFile="$PID_FILE" \
      -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o PubkeyAuthentication=yes \
      -o AllowUsers="$TEST_USER" -E "$LOG_FILE"; then
      log "sshd did not start on port $port"; tail -n 20 "$LOG_FILE" >&2 || true; exit 1
    fi
    echo "$port" >"$PORT_FILE"
  fi
  write_client_config "$port"
  local i
  for i in $(seq 50); do
    listening "$port" && break
    if [[ $i == 50 ]]; then log "sshd does not listen on $port"; tail -n 20 "$LOG_FILE" >&2 || true; exit 1; fi
    sleep 0.1
  done
  # The login the tests rely on, end to end: key, known_hosts, user, and Slurm on its PATH.
  if ! ssh -F "$CLIENT_CONFIG" "$HOST_ALIAS" -- command -v sbatch >/dev/null; then
    log "ssh $HOST_ALIAS cannot run sbatch"; tail -n 20 "$LOG_FILE" >&2 || true; exit 1
  fi
  if ssh -F "$CLIENT_CONFIG" "$NOSLURM_ALIAS" -- command -v sbatch >/dev/null \
      || ! ssh -F "$CLIENT_CONFIG" "$NOSLURM_ALIAS" -- command -v rsync >/dev/null; then
    log "ssh $NOSLURM_ALIAS should run rsync but not sbatch"; exit 1
  fi
  cat >"$ENV_FILE" <<EOF
export TORCHX_EXT_TEST_SSH_CONFIG=$CLIENT_CONFIG
export TORCHX_EXT_TEST_SSH_HOST=$HOST_ALIAS
export TORCHX_EXT_TEST_SSH_PORT=$port
export TORCHX_EXT_TEST_SSH_KEY=$CLIENT_KEY
export TORCHX_EXT_TEST_SSH_USER=$TEST_USER
export TORCHX_EXT_TEST_SSH_NOSLURM_HOST=$NOSLURM_ALIAS
EOF
  log "sshd up on 127.0.0.1:$port (ssh -F $CLIENT_CONFIG $HOST_ALIAS)"
}

stop() {
  # The tests read this file to know sshd is up: it goes first.
  rm -f "$ENV_FILE"
  if alive "$PID_FILE"; then
    local pid i; pid="$(cat "$PID_FILE")"
    # Only the listener: sessions of other users of this machine's sshd (if any) are not ours.
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do running "$pid" || break; sleep 0.1; done
    running "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE" "$PORT_FILE"
}

status() {
  alive "$PID_FILE" && [[ -f "$CLIENT_CONFIG" ]] \
    && timeout 10 ssh -F "$CLIENT_CONFIG" "$HOST_ALIAS" -- true
}

case "${1:-}" in
  install) do_install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
