#!/usr/bin/env bash
# Nodes with their own addresses on this one machine: a Linux network namespace per node, each
# joined by a veth pair to one bridge in the root namespace. Used by ray_multinode.sh and
# slurm_multinode.sh; see testbed/README.md for the layout.
#   bash testbed/netns.sh add NS ADDR     namespace NS with address ADDR (idempotent)
#   bash testbed/netns.sh del NS          kill everything in NS, remove it and its veth
#   bash testbed/netns.sh kill NS         SIGKILL every process in NS (a lost node; NS stays)
#   bash testbed/netns.sh cut NS|heal NS  take NS's link down / up (a partition)
#   bash testbed/netns.sh exec NS CMD...  run CMD in NS's network namespace (mounts kept)
#   bash testbed/netns.sh gc              remove the bridge if no txe- namespace is left
#   bash testbed/netns.sh status|stop     bridge up? / remove every txe- namespace and the bridge
# Addresses: 198.18.0.0/24 (RFC 2544's benchmarking range, never routed here); the bridge holds
# .1 in the root namespace. No default route anywhere, no NAT: nothing leaves the machine.
set -euo pipefail

BR=txe-br0
NET=198.18.0
PREFIX=24

log() { echo "[netns.sh] $*" >&2; }

# The host end of NS's veth (IFNAMSIZ: at most 15 characters).
hostif() { local n="${1#txe-}"; echo "txv-${n:0:11}"; }

bridge_up() {
  if ! ip link show "$BR" >/dev/null 2>&1; then
    ip link add "$BR" type bridge
    ip addr add "$NET.1/$PREFIX" dev "$BR"
  fi
  ip link set "$BR" up
  # Docker set FORWARD's policy to DROP and bridged frames pass iptables here: allow bridge to
  # bridge only (no NAT, nothing in or out of the bridge).
  iptables -C FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null || iptables -I FORWARD -i "$BR" -o "$BR" -j ACCEPT
}

add() {
  local ns="$1" addr="$2" hif; hif="$(hostif "$ns")"
  [[ "$addr" == "$NET".* ]] || { log "address $addr is outside $NET.0/$PREFIX"; return 2; }
  bridge_up
  [[ -e "/run/netns/$ns" ]] || ip netns add "$ns"
  if ! ip link show "$hif" >/dev/null 2>&1; then
    ip link add "$hif" type veth peer name eth0 netns "$ns"
  fi
  ip link set "$hif" master "$BR" up
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  ip -n "$ns" addr replace "$addr/$PREFIX" dev eth0
}

kill_ns() {
  local ns="$1" i pids
  [[ -e "/run/netns/$ns" ]] || return 0
  for i in $(seq 50); do
    pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    [[ -z "${pids// }" ]] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  log "processes of $ns survive SIGKILL: $(ip netns pids "$ns" | tr '\n' ' ')"
}

del() {
  local ns="$1"
  kill_ns "$ns"
  ip link del "$(hostif "$ns")" 2>/dev/null || true
  [[ -e "/run/netns/$ns" ]] && ip netns del "$ns"
  return 0
}

# The bridge and its iptables rule go once no txe- namespace is left (another testbed may use them).
gc() {
  [[ -z "$(ip netns list 2>/dev/null | awk '{print $1}' | grep '^txe-' || true)" ]] || return 0
  ip link del "$BR" 2>/dev/null || true
  while iptables -C FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null; do
    iptables -D FORWARD -i "$BR" -o "$BR" -j ACCEPT
  done
}

stop() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^txe-' || true); do del "$ns"; done
  gc
}

case "${1:-}" in
  add) add "${2:?namespace}" "${3:?address}" ;;
  del) del "${2:?namespace}" ;;
  kill) kill_ns "${2:?namespace}" ;;
  cut) ip link set "$(hostif "${2:?namespace}")" down ;;
  heal) ip link set "$(hostif "${2:?namespace}")" up ;;
  exec) ns="${2:?namespace}"; shift 2; exec nsenter --net="/run/netns/$ns" "$@" ;;
  gc) gc ;;
  status) ip link show "$BR" >/dev/null 2>&1 ;;
  stop) stop ;;
  *) echo "usage: $0 add NS ADDR|del NS|kill NS|cut NS|heal NS|exec NS CMD...|status|stop" >&2; exit 2 ;;
esac
