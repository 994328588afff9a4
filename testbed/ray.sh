#!/usr/bin/env bash
# Local single-node Ray head for the ray_jobs tests.
#   bash testbed/ray.sh start|stop|kill-head|status
# Uses the Python env in $VENV (default <repo>/.venv); installs nothing (ray[default] comes
# from the package extra). Writes testbed/.state/ray.env with TORCHX_EXT_TEST_RAY_DASHBOARD,
# TORCHX_EXT_TEST_RAY_ADDRESS (GCS) and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see below).
# Job drivers start in the head's temp dir (its cwd); tests must not rely on their cwd.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"
PY="$VENV/bin/python"
STATE="$ROOT/testbed/.state"
ENV_FILE="$STATE/ray.env"   # for the tests
VARS="$STATE/ray.vars"      # private: temp dir and ports of this head

# Ray turns --node-ip-address 127.0.0.1 into the host's routable IP unless this is 0 (the
# single-machine mode Ray uses on macOS); with it, every address Ray advertises and every
# server (GCS, raylet, dashboard, agents, metrics, client server) listens on 127.0.0.1 only.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
# Job entrypoints run with the head's environment: `python` there must be the venv's
# (it has ray and this package), as with an activated venv on a real cluster.
export PATH="$VENV/bin:$PATH"

load() { [[ -f "$VARS" ]] && source "$VARS"; }

dashboard_up() {  # the Jobs API (not just the web UI) answers
  load || return 1
  "$PY" - "$DASH_PORT" <<'EOF'
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/jobs/", timeout=3).read()
EOF
}

# PIDs of this head. Ray processes rename themselves (which also overwrites their visible
# environment), start new sessions and outlive their parents (after kill-head the raylet
# dies and agents / job drivers are reparented to init), so no single test finds them all.
# Roots: processes whose cwd is under our temp dir (Ray is started there and its processes
# inherit it) or that carry the TORCHX_EXT_RAY_HEAD=<temp dir> marker (e.g. a user process
# that changed directory); then all their descendants. $1: regex on the command line
# restricting the roots (kill-head).
head_pids() {
  load || return 0
  local roots
  roots="$({ grep -lzx "TORCHX_EXT_RAY_HEAD=$TMPD" /proc/[0-9]*/environ
             find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$TMPD" -o -lname "$TMPD/*" \); } 2>/dev/null | cut -d/ -f3 | tr '\n' ' ')" || true
  ps -wweo pid=,ppid=,args= | awk -v roots="$roots" -v only="${1:-}" -v self=$$ '
    BEGIN { split(roots, r, " "); for (i in r) root[r[i]]=1 }
    { pid[NR]=$1; ppid[NR]=$2; $1=$2=""; if ((pid[NR] in root) && (only=="" || $0 ~ only)) mark[pid[NR]]=1 }
    END { do { n=0; for (i=1;i<=NR;i++) if (!(pid[i] in mark) && (ppid[i] in mark)) { mark[pid[i]]=1; n++ } } while (n)
          for (p in mark) if (p != self) print p }'
}

kill_pids() { local p; for p in "$@"; do kill -9 "$p" 2>/dev/null || true; done; }

free_ports() {  # $1 single free loopback ports, then the base of a free block of 1000
  "$PY" - "$1" <<'EOF'
import random, socket, sys
def free(p):
    s = socket.socket()
    try: s.bind(("127.0.0.1", p)); return True
    except OSError: return False
    finally: s.close()
socks, ports = [], []
for _ in range(int(sys.argv[1])):  # hold them open so we never get the same one twice
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s); ports.append(s.getsockname()[1])
# Worker ports (each worker, job supervisor and driver takes one; hundreds of waiting jobs
# need hundreds): below the ephemeral range (32768+) where the ports above come from.
for _ in range(100):
    base = random.randrange(20000, 31000, 1000)
    if all(free(p) for p in range(base, base + 1000)): break
print(*ports, base)
EOF
}

start() {
  if dashboard_up 2>/dev/null; then echo "ray head already up: $(cat "$ENV_FILE")"; return 0; fi
  stop >/dev/null  # leftovers of a dead head
  [[ -x "$VENV/bin/ray" ]] || { echo "no ray in $VENV (install ray[default] or set VENV)" >&2; exit 1; }
  mkdir -p "$STATE"
  read -r GCS_PORT DASH_PORT AGENT_HTTP AGENT_GRPC RTENV CLIENT NM OM METRICS DMETRICS AMETRICS WBASE \
    <<<"$(free_ports 11)"
  # Short temp dir: Ray's unix sockets live under it (108-byte sun_path limit).
  TMPD="$(mktemp -d /tmp/rtx-XXXXXX)"
  printf 'TMPD=%s\nGCS_PORT=%s\nDASH_PORT=%s\n' "$TMPD" "$GCS_PORT" "$DASH_PORT" >"$VARS"
  # Fixed default ports (44217/44227) would clash with a second head.
  export AUTOSCALER_METRIC_PORT="$AMETRICS" DASHBOARD_METRIC_PORT="$DMETRICS"
  # --num-cpus 8 on 2 cores: Ray CPUs are only admission accounting; tests run several small
  # jobs (each driver holds entrypoint_num_cpus) plus gangs of 1-CPU replicas at once.
  # "sandbox" resource and node label let tests exercise entrypoint_resources and
  # entrypoint_label_selector. Small object store: tests move no data.
  if ! (cd "$TMPD" && TORCHX_EXT_RAY_HEAD="$TMPD" exec "$VENV/bin/ray" start --head \
      --node-ip-address 127.0.0.1 --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --include-dashboard true \
      --dashboard-agent-listen-port "$AGENT_HTTP" --dashboard-agent-grpc-port "$AGENT_GRPC" \
      --runtime-env-agent-port "$RTENV" --ray-client-server-port "$CLIENT" \
      --node-manager-port "$NM" --object-manager-port "$OM" --metrics-export-port "$METRICS" \
      --min-worker-port "$WBASE" --max-worker-port "$((WBASE + 999))" \
      --num-cpus 8 --resources '{"sandbox": 4}' --labels testbed=ray \
      --object-store-memory 200000000 --temp-dir "$TMPD" --disable-usage-stats \
      >"$STATE/ray-start.log" 2>&1); then
    cat "$STATE/ray-start.log" >&2; stop >/dev/null; exit 1
  fi
  for _ in $(seq 60); do
    if dashboard_up 2>/dev/null; then
      # Clients of the GCS address (ray.init, `ray status`) need the same setting, else
      # they too rewrite 127.0.0.1 and time out; Jobs API (HTTP) clients do not care.
      printf 'export TORCHX_EXT_TEST_RAY_DASHBOARD=http://127.0.0.1:%s\nexport TORCHX_EXT_TEST_RAY_ADDRESS=127.0.0.1:%s\nexport RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n' \
        "$DASH_PORT" "$GCS_PORT" >"$ENV_FILE"
      cat "$ENV_FILE"; return 0
    fi
    sleep 1
  done
  echo "ray dashboard did not answer on port $DASH_PORT within 60 s" >&2
  cat "$STATE/ray-start.log" >&2
  tail -n 30 "$TMPD"/session_latest/logs/{dashboard.log,gcs_server.out,raylet.out} >&2 || true
  stop >/dev/null; exit 1
}

# Not `ray stop --force`: it kills every Ray process on the machine, other heads included.
stop() {
  load || { rm -f "$ENV_FILE"; return 0; }
  kill_pids $(head_pids)
  rm -rf "$TMPD" "$ENV_FILE" "$VARS"
  echo "ray head stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  # Abrupt loss of the head's control plane: SIGKILL GCS and dashboard (with its module
  # subprocesses); raylet and workers are left to notice on their own.
  kill-head) load || { echo "no ray head" >&2; exit 1; }
             kill_pids $(head_pids 'gcs_server|dashboard/dashboard\.py') ;;
  status) dashboard_up 2>/dev/null ;;
  *) echo "usage: $0 start|stop|kill-head|status" >&2; exit 2 ;;
esac
