#!/usr/bin/env bash
# Two Ray nodes on one machine, started against loopback, with token authentication.
# Exercises the multi-node code paths (object transfer between raylets, placement across nodes)
# without a cloud. The dashboard / job API listens on 127.0.0.1 only. Note that Ray itself swaps
# 127.0.0.1 for the host's routable IP as the node address and its GCS/raylet gRPC ports listen on
# all interfaces: token auth is what guards them, so keep a host firewall on shared machines.
#
#   RAY=.venv/bin/ray cluster/local_multinode.sh start    # head + one worker node
#   RAY=.venv/bin/ray cluster/local_multinode.sh status
#   RAY=.venv/bin/ray cluster/local_multinode.sh stop     # the Ray processes under TEMP_DIR (default /tmp/ray)
#
# Then, from the repo root, the README's "Run on a cluster" commands (cluster/README.md).
#
# Token: $RAY_AUTH_TOKEN if set, else ~/.ray/auth_token (created by `ray get-auth-token --generate`
# on first use). Clients need RAY_AUTH_MODE=token and the same token.
# Knobs (env): GCS_PORT DASHBOARD_PORT HEAD_AGENT_PORT CPUS_PER_NODE GPUS_PER_NODE OBJECT_STORE_BYTES
# TEMP_DIR RAY. If another Ray instance runs on this machine, move DASHBOARD_PORT and HEAD_AGENT_PORT
# (52365 is every Ray head's default agent port).
set -euo pipefail

GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HEAD_AGENT_PORT="${HEAD_AGENT_PORT:-52365}"
NODE2_PORT_BASE="${NODE2_PORT_BASE:-52466}"  # second node's agent/runtime-env/metrics ports: BASE..BASE+3
CPUS_PER_NODE="${CPUS_PER_NODE:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-500000000}"
RAY="${RAY:-ray}"
TEMP_DIR="${TEMP_DIR:-}"  # optional Ray temp root (default /tmp/ray), keeps this session apart
TEMP_ARGS=()
if [[ -n "$TEMP_DIR" ]]; then TEMP_ARGS=(--temp-dir "$TEMP_DIR"); fi

export RAY_AUTH_MODE=token
# Job entrypoints (`medi-dist`, `python`) resolve through the head's PATH: put ray's env first.
RAY_BIN_DIR="$(cd "$(dirname "$(command -v "$RAY")")" && pwd)"
export PATH="$RAY_BIN_DIR:$PATH"

ensure_token() {
  if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    "$RAY" get-auth-token --generate >/dev/null  # no-op when ~/.ray/auth_token exists
  fi
}

start() {
  ensure_token
  # Head: GCS, dashboard and job server; the dashboard binds 127.0.0.1 only.
  "$RAY" start --head \
    --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
    --num-cpus "$CPUS_PER_NODE" --num-gpus "$GPUS_PER_NODE" \
    --object-store-memory "$OBJECT_STORE_BYTES" \
    --min-worker-port 20000 --max-worker-port 20999 \
    "${TEMP_ARGS[@]}" --disable-usage-stats
  # Second node on the same host: its own agent/metrics/worker ports so nothing collides.
  "$RAY" start --address "127.0.0.1:$GCS_PORT" \
    --node-ip-address 127.0.0.1 \
    --num-cpus "$CPUS_PER_NODE" --num-gpus "$GPUS_PER_NODE" \
    --object-store-memory "$OBJECT_STORE_BYTES" \
    --dashboard-agent-listen-port "$NODE2_PORT_BASE" --dashboard-agent-grpc-port "$((NODE2_PORT_BASE + 1))" \
    --runtime-env-agent-port "$((NODE2_PORT_BASE + 2))" --metrics-export-port "$((NODE2_PORT_BASE + 3))" \
    --min-worker-port 21000 --max-worker-port 21999 \
    "${TEMP_ARGS[@]}" --disable-usage-stats
  echo "Ray cluster up: GCS 127.0.0.1:$GCS_PORT, dashboard/jobs http://127.0.0.1:$DASHBOARD_PORT (token auth)"
}

# The processes of the Ray sessions under the temp root (their command lines name it) and their
# children: with TEMP_DIR set, this cluster only (`ray stop` would end every Ray instance here).
stop() {
  local root="${TEMP_DIR:-/tmp/ray}" pids=() queue=() p
  mapfile -t queue < <(pgrep -f -- "$root" | grep -vx "$$" || true)
  while ((${#queue[@]})); do
    p="${queue[0]}"; queue=("${queue[@]:1}")
    [[ " ${pids[*]} " == *" $p "* ]] && continue
    pids+=("$p")
    mapfile -t -O "${#queue[@]}" queue < <(pgrep -P "$p" || true)
  done
  if ((${#pids[@]} == 0)); then echo "no Ray processes under $root"; return 0; fi
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 20); do
    local alive=0
    # a zombie (stat Z) has ended; where PID 1 does not reap, it stays listed
    for p in "${pids[@]}"; do [[ "$(ps -o stat= -p "$p" 2>/dev/null)" == [^Z]* ]] && alive=1; done
    ((alive)) || break
    sleep 0.5
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true  # gcs_server ignores SIGTERM
  echo "stopped ${#pids[@]} Ray process(es) under $root"
}

case "${1:-}" in
  start) start ;;
  status) "$RAY" status --address "127.0.0.1:$GCS_PORT" ;;
  stop) stop ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
