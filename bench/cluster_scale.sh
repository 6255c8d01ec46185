#!/usr/bin/env bash
# Cluster mode at scale on one machine (docs/BENCHMARKS.md, "Cluster"):
#   1. NODES nodes (default 5) each hold PER_NODE (default 19,000) idle
#      authenticated TCP connections, one load process per node;
#   2. 1:1 chat with the clients spread over every node (most messages cross
#      nodes), then the same with all nodes but n0 drained (no hop).
# Prints each skylark-load table; the JSON reports stay in $OUT.
#
#   bench/cluster_scale.sh
#   NODES=3 PER_NODE=5000 CHAT_RATE=1000 bench/cluster_scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-5}
PER_NODE=${PER_NODE:-19000}
RAMP_RATE=${RAMP_RATE:-300}        # new connections per second, per load process
CHAT_PAIRS=${CHAT_PAIRS:-500}
CHAT_RATE=${CHAT_RATE:-1000}       # messages per second in all
CHAT_SECONDS=${CHAT_SECONDS:-10}
OUT=${OUT:-target/cluster-scale}
HTTP_PORT=7480 TCP_PORT=7481

cargo build --release -q -p skylark -p skylark-load
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/skylark load=$target/release/skylark-load
mkdir -p "$OUT"

. bench/cluster_lib.sh
start_provisioned_cluster $((NODES * PER_NODE)) "$NODES"

echo "== 1. idle: $PER_NODE connections on each of $NODES nodes"
loads=()
for ((i = 0; i < NODES; i++)); do
  host=127.0.0.$((i + 1))
  "$load" idle --manifest "$OUT/manifest.json" --server "http://$host:$HTTP_PORT" --tcp "$host:$TCP_PORT" \
    --connections "$PER_NODE" --offset $((i * PER_NODE)) --rate "$RAMP_RATE" --sources 80 --hold-secs 20 \
    --server-pid "${node_pids[$i]}" --report "$OUT/idle-n$i.json" >"$OUT/idle-n$i.txt" 2>&1 &
  loads+=($!)
done
failed=0
for pid in "${loads[@]}"; do wait "$pid" || failed=1; done
for ((i = 0; i < NODES; i++)); do echo "-- n$i"; cat "$OUT/idle-n$i.txt"; done
[ "$failed" = 0 ] || { echo "a load process failed" >&2; exit 1; }

# Let the disconnects of the idle run settle (actors retire, leases are
# released) before timing messages.
sleep 15
all=$(for ((i = 0; i < NODES; i++)); do printf '127.0.0.%d:%d,' $((i + 1)) "$TCP_PORT"; done)
echo "== 2a. chat across nodes: $CHAT_PAIRS pairs spread over $NODES nodes, $CHAT_RATE msgs/s"
"$load" chat --manifest "$OUT/manifest.json" --tcp "${all%,}" --pairs "$CHAT_PAIRS" --rate "$CHAT_RATE" \
  --seconds "$CHAT_SECONDS" --sources 8 --report "$OUT/chat-spread.json"

echo "== 2b. the same on one node (the others drained)"
for ((i = 1; i < NODES; i++)); do "$bin" cluster drain "n$i" --store "$store" >/dev/null; done
"$bin" cluster status --store "$store"
"$load" chat --manifest "$OUT/manifest.json" --tcp "127.0.0.1:$TCP_PORT" --pairs "$CHAT_PAIRS" --rate "$CHAT_RATE" \
  --seconds "$CHAT_SECONDS" --sources 8 --report "$OUT/chat-one-node.json"
