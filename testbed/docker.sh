#!/usr/bin/env bash
# Local Docker engine for torchx-ext tests (see /work/shared/TESTBED.md, "Docker").
#   bash testbed/docker.sh install|start|stop|restart|status
# There is no image registry here: images are built locally (testbed/docker/rootfs.sh) and the
# daemon is started with a dead proxy so that any pull attempt fails at once on loopback.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=$HERE/docker
STATE=$HERE/.state
LOG=/var/log/torchx-ext-dockerd.log
DOCKERD_PID=/var/run/torchx-ext-dockerd.pid        # also set in docker/daemon.json
CONTAINERD_PID=/var/run/torchx-ext-containerd.pid
CONTAINERD_SOCK=/run/containerd/containerd.sock
BUSYBOX=torchx-ext-test/busybox:latest
PYTHON=torchx-ext-test/python:latest
# The Debian client matches the 20.10 engine; pinning the API version also lets a newer client
# (e.g. a 28.x one in /usr/local/bin) and the Python SDK talk to it.
export DOCKER_HOST=unix:///var/run/docker.sock DOCKER_API_VERSION=1.41
DOCKER=/usr/bin/docker

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS [PID] CMD...: poll until CMD succeeds (give up if PID dies)
  local end=$((SECONDS + $1)) pid=; shift
  case $1 in [0-9]*) pid=$1; shift ;; esac
  until "$@" >/dev/null 2>&1; do
    [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null || { echo "process $pid died; see $LOG" >&2; return 1; }
    [ $SECONDS -lt $end ] || { echo "timed out: $*; see $LOG" >&2; return 1; }
    sleep 0.2
  done
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL
  running "$1" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1")
  kill "$pid"
  wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

install() {
  export DEBIAN_FRONTEND=noninteractive
  if ! dpkg -s docker.io busybox-static >/dev/null 2>&1; then
    apt-cache show docker.io >/dev/null 2>&1 || apt-get -o DPkg::Lock::Timeout=600 update
    apt-get -o DPkg::Lock::Timeout=600 install -y docker.io busybox-static
  fi
  # the python image is assembled from these host packages
  dpkg -s python3.11 libpython3.11-stdlib >/dev/null 2>&1 ||
    apt-get -o DPkg::Lock::Timeout=600 install -y python3.11
}

start_daemons() {
  # Our own containerd (not dockerd's managed one) so that `restart` restarts dockerd only and
  # running containers keep their shims (live-restore, see docker/daemon.json).
  if ! running "$CONTAINERD_PID" && ! ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1; then
    rm -f "$CONTAINERD_SOCK"  # stale
    setsid containerd --config "$CONF/containerd.toml" >>"$LOG" 2>&1 </dev/null &
    echo $! >"$CONTAINERD_PID"
    wait_for 30 $! ctr --address "$CONTAINERD_SOCK" version
  fi
  local pid=
  if ! running "$DOCKERD_PID"; then
    # Dead proxy: a pull (which would leave this machine) fails at once with "proxyconnect ...
    # connection refused". No TCP listener: only the unix socket in daemon.json.
    HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
      setsid dockerd --config-file "$CONF/daemon.json" >>"$LOG" 2>&1 </dev/null &
    pid=$!
  fi
  wait_for 60 $pid $DOCKER info
}

# Images carry a label with a hash of how they are built: a changed recipe rebuilds them.
recipe() { (cat "$CONF/rootfs.sh"; declare -f build_image) | sha256sum | cut -c1-16; }
have_image() {
  [ "$($DOCKER image inspect -f '{{index .Config.Labels "torchx-ext-test.recipe"}}' "$1" 2>/dev/null)" = "$(recipe)" ]
}

build_image() {  # build_image busybox|python NAME CMD
  local dir; dir=$(mktemp -d /tmp/torchx-ext-rootfs.XXXXXX)
  bash "$CONF/rootfs.sh" "$1" "$dir/rootfs"
  tar -C "$dir/rootfs" -cf - . | $DOCKER import \
    -c "LABEL torchx-ext-test.recipe=$(recipe)" -c 'ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin' \
    -c 'ENV LANG=C.UTF-8' -c "CMD [\"$3\"]" - "$2" >/dev/null
  rm -rf "$dir"
}

start() {
  mkdir -p "$STATE"
  start_daemons
  have_image $BUSYBOX || build_image busybox $BUSYBOX sh
  have_image $PYTHON || build_image python $PYTHON python3
  cat >"$STATE/docker.env" <<EOF
export TORCHX_EXT_TEST_DOCKER=1
export TORCHX_EXT_TEST_DOCKER_BUSYBOX=$BUSYBOX
export TORCHX_EXT_TEST_DOCKER_PYTHON=$PYTHON
export DOCKER_HOST=$DOCKER_HOST
export DOCKER_API_VERSION=$DOCKER_API_VERSION
EOF
}

stop() {
  # With live-restore containers outlive dockerd; "stop" means everything goes down.
  if running "$DOCKERD_PID"; then
    $DOCKER ps -q | xargs -r $DOCKER kill >/dev/null 2>&1 || true
  fi
  stop_pid "$DOCKERD_PID"
  stop_pid "$CONTAINERD_PID"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  restart) stop_pid "$DOCKERD_PID"; start_daemons ;;  # containers survive (live-restore)
  status) $DOCKER info >/dev/null 2>&1 ;;
  *) echo "usage: $0 install|start|stop|restart|status" >&2; exit 2 ;;
esac
