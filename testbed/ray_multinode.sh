#!/usr/bin/env bash
# A three-node Ray cluster whose nodes have their own addresses (testbed/netns.sh; layout in
# testbed/README.md): the head in namespace txe-rh (198.18.0.10), workers in txe-rw1 (.11) and
# txe-rw2 (.12). Each node its own namespace, so Ray's default ports collide with nothing.
#   bash testbed/ray_multinode.sh start|stop|status
#   bash testbed/ray_multinode.sh kill-node w1|w2    SIGKILL everything in the node's namespace
#   bash testbed/ray_multinode.sh start-node w1|w2   (re)join a worker (idempotent)
#   bash testbed/ray_multinode.sh cut w1|w2 / heal w1|w2   the node's link down / up
# Uses the Python env in $VENV (default <repo>/.venv). Writes testbed/.state/ray_multinode.env.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VARS="$ROOT/testbed/.state/ray_multinode.vars"  # the env the cluster was started with
# A node started again (start-node) must run the cluster's Ray, whatever $VENV the caller has.
if [[ "${1:-}" != start && -f "$VARS" ]]; then source "$VARS"; fi
VENV="${VENV:-$ROOT/.venv}"
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
NETNS="$ROOT/testbed/netns.sh"
STATE="$ROOT/testbed/.state"
ENV_FILE="$STATE/ray_multinode.env"
TMPROOT=/tmp/txe-ray   # one temp dir per node (Ray's unix sockets live there: keep it short)
HEAD_NS=txe-rh HEAD_IP=198.18.0.10
declare -A NS=([h]=txe-rh [w1]=txe-rw1 [w2]=txe-rw2)
declare -A IP=([h]=198.18.0.10 [w1]=198.18.0.11 [w2]=198.18.0.12)
GCS_PORT=6379 DASH_PORT=8265

# With 0 (the single-node testbed's setting) a worker refuses to join: "Multi-node Ray clusters
# are not supported"; with 1 each node advertises its --node-ip-address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
export RAY_USAGE_STATS_ENABLED=0
# Job entrypoints and replicas run with the node's environment: `python` must be the venv's.
export PATH="$VENV/bin:$PATH"

log() { echo "[ray_multinode.sh] $*" >&2; }

dashboard_up() {
  "$VENV/bin/python" - <<EOF 2>/dev/null
import urllib.request
urllib.request.urlopen("http://$HEAD_IP:$DASH_PORT/api/jobs/", timeout=3).read()
EOF
}

# Addresses of the nodes the head reports ALIVE and that started at or after $1 (ms since the
# epoch; default 0). A killed node stays ALIVE there until its health checks fail (~15 s).
alive_nodes() {
  "$VENV/bin/python" - "${1:-0}" <<EOF 2>/dev/null
import json, sys, urllib.request
d = json.load(urllib.request.urlopen("http://$HEAD_IP:$DASH_PORT/nodes?view=summary", timeout=5))
for n in d["data"]["summary"]:
    r = n["raylet"]
    if r.get("state") == "ALIVE" and int(r.get("startTimeMs", 0)) >= int(sys.argv[1]):
        print(r["nodeManagerAddress"])
EOF
}

node_alive() { alive_nodes "${2:-0}" | grep -qx "${IP[$1]}"; }

# Is a raylet running in the node's namespace (whatever the head believes)?
raylet_running() {
  local p
  for p in $(ip netns pids "${NS[$1]}" 2>/dev/null); do
    [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == raylet ]] && return 0
  done
  return 1
}

start_node() {  # $1: h, w1 or w2
  local n="$1" ns="${NS[$1]}" ip="${IP[$1]}" args
  bash "$NETNS" add "$ns" "$ip"
  mkdir -p "$TMPROOT/$n"
  # Small object store: tests move no data. CPUs are admission accounting only: the head holds
  # 1 (so a three-replica STRICT_SPREAD group fits on three nodes), each worker 2 (a surviving
  # worker can take a lost node's replica).
  args=(--node-ip-address "$ip" --temp-dir "$TMPROOT/$n" --object-store-memory 100000000 --disable-usage-stats)
  if [[ "$n" == h ]]; then
    # the head's own address: inside its namespace that and loopback are all there is, but say so
    args+=(--head --port "$GCS_PORT" --dashboard-host "$ip" --dashboard-port "$DASH_PORT"
           --include-dashboard true --num-cpus 1 --labels txe-node=h)
  else
    args+=(--address "$HEAD_IP:$GCS_PORT" --num-cpus 2 --labels "txe-node=$n")
  fi
  (cd "$TMPROOT/$n" && nsenter --net="/run/netns/$ns" "$VENV/bin/ray" start "${args[@]}") \
    >"$STATE/ray_multinode-$n.log" 2>&1 || { cat "$STATE/ray_multinode-$n.log" >&2; return 1; }
}

wait_nodes() {  # $1: start time (ms, as in alive_nodes); every node of $2... alive
  local since="$1" i n ok; shift
  for i in $(seq 90); do
    ok=1
    for n in "$@"; do node_alive "$n" "$since" || { ok=0; break; }; done
    [[ $ok == 1 ]] && return 0
    sleep 1
  done
  log "nodes $* not all alive after 90 s: $(alive_nodes | tr '\n' ' ')"; return 1
}

start() {
  [[ -x "$VENV/bin/ray" ]] || { log "no ray in $VENV (install ray[default] or set VENV)"; exit 1; }
  mkdir -p "$STATE"
  if ! dashboard_up; then
    stop >/dev/null  # (removes $VARS: written below)
    start_node h
    local i
    for i in $(seq 60); do dashboard_up && break; sleep 1; done
    dashboard_up || { log "dashboard at $HEAD_IP:$DASH_PORT did not answer"; stop >/dev/null; exit 1; }
  fi
  printf 'VENV=%q\n' "$VENV" >"$VARS"
  local n
  for n in w1 w2; do raylet_running "$n" || start_node "$n"; done
  wait_nodes 0 h w1 w2 || { stop >/dev/null; exit 1; }
  cat >"$ENV_FILE" <<EOF
export TORCHX_EXT_TEST_RAYMN_DASHBOARD=http://$HEAD_IP:$DASH_PORT
export TORCHX_EXT_TEST_RAYMN_HEAD=$HEAD_IP
export TORCHX_EXT_TEST_RAYMN_WORKERS=w1=${NS[w1]}=${IP[w1]},w2=${NS[w2]}=${IP[w2]}
export TORCHX_EXT_TEST_RAYMN_SCRIPT=$ROOT/testbed/ray_multinode.sh
EOF
  cat "$ENV_FILE"
}

stop() {
  rm -f "$ENV_FILE" "$VARS"
  local n
  for n in w2 w1 h; do bash "$NETNS" del "${NS[$n]}"; done
  bash "$NETNS" gc
  rm -rf "$TMPROOT"
  echo "ray multinode cluster stopped"
}

node_arg() { [[ "${1:-}" == w1 || "${1:-}" == w2 ]] || { log "node: w1 or w2"; exit 2; }; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) dashboard_up && [[ "$(alive_nodes | wc -l)" -ge 3 ]] ;;
  kill-node) node_arg "${2:-}"; bash "$NETNS" kill "${NS[$2]}" ;;
  start-node) node_arg "${2:-}"; bash "$NETNS" heal "${NS[$2]}"
              if ! raylet_running "$2"; then since=$(($(date +%s) * 1000 - 1000)); start_node "$2"; wait_nodes "$since" "$2"; fi ;;
  cut) node_arg "${2:-}"; bash "$NETNS" cut "${NS[$2]}" ;;
  heal) node_arg "${2:-}"; bash "$NETNS" heal "${NS[$2]}" ;;
  *) echo "usage: $0 start|stop|status|kill-node N|start-node N|cut N|heal N" >&2; exit 2 ;;
esac
