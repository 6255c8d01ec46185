#!/usr/bin/env bash
# A cluster loses a node (docs/BENCHMARKS.md, "Cluster mode: a killed node's
# devices"): NODES nodes (default 5) hold PROCS × PER_PROC idle clients
# (default 4 × 15,000), spread over every node; node n0 is killed with
# SIGKILL; each load process reports how long the clients it lost took to be
# back and serving (reconnected to another node, a message acknowledged), and
# the per-client times of all processes are merged into one line.
#
#   bench/cluster_failover.sh
#   NODES=3 PROCS=1 PER_PROC=3000 bench/cluster_failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-5}
PROCS=${PROCS:-4}
PER_PROC=${PER_PROC:-15000}
RAMP_RATE=${RAMP_RATE:-300}   # clients started per second, per load process
SETTLE=${SETTLE:-20}          # seconds measured at least, after the kill
OUT=${OUT:-target/cluster-failover}
HTTP_PORT=7480 TCP_PORT=7481

cargo build --release -q -p skylark -p skylark-load
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/skylark load=$target/release/skylark-load
mkdir -p "$OUT"
rm -f "$OUT"/failover-p*.json

. bench/cluster_lib.sh
start_provisioned_cluster $((PROCS * PER_PROC)) "$NODES"

# 100 client addresses: after the kill a node may hold 15,000 of the clients,
# which must stay under the server's 256 connections per client address.
all=$(for ((i = 0; i < NODES; i++)); do printf '127.0.0.%d:%d,' $((i + 1)) "$TCP_PORT"; done)
echo "== $PROCS load processes × $PER_PROC clients over $NODES nodes"
loads=()
for ((p = 0; p < PROCS; p++)); do
  "$load" failover --manifest "$OUT/manifest.json" --server "http://127.0.0.1:$HTTP_PORT" --tcp "${all%,}" \
    --clients "$PER_PROC" --offset $((p * PER_PROC)) --rate "$RAMP_RATE" --sources 100 \
    --kill-file "$work/killed" --settle-secs "$SETTLE" --report "$OUT/failover-p$p.json" \
    >"$OUT/failover-p$p.txt" 2>"$OUT/failover-p$p.err" &
  loads+=($!)
done
for ((p = 0; p < PROCS; p++)); do
  until grep -q '^ready' "$OUT/failover-p$p.txt" 2>/dev/null; do
    kill -0 "${loads[$p]}" 2>/dev/null || { echo "load process $p failed:" >&2; tail "$OUT/failover-p$p.err" >&2; exit 1; }
    sleep 0.5
  done
done
sleep 2
echo "== killing n0 (SIGKILL)"
t=$(date +%s%3N)
kill -9 "${node_pids[0]}"
echo "$t" >"$work/killed"
failed=0
for pid in "${loads[@]}"; do wait "$pid" || failed=1; done
for ((p = 0; p < PROCS; p++)); do echo "-- load process $p"; grep -v '^ready' "$OUT/failover-p$p.txt"; done
[ "$failed" = 0 ] || { echo "a load process failed" >&2; exit 1; }
python3 - "$OUT"/failover-p*.json <<'PY'
import json, math, sys
reports = [json.load(open(f)) for f in sys.argv[1:]]
dropped = sum(r["dropped"] for r in reports)
times = sorted(t for r in reports for t in r["back_seconds"])
def at(q):
    rank = max(1, math.ceil(dropped * q))
    return times[rank - 1] if rank <= len(times) else float("nan")
clients = sum(r["clients"] for r in reports)
print(f"all: {clients} clients, {dropped} dropped by the kill, {len(times)} back and serving; "
      f"50% back in {at(0.5):.2f} s, 99% in {at(0.99):.2f} s, all in {at(1.0):.2f} s; "
      f"{sum(r['failed_attempts'] for r in reports)} failed attempts on the way")
PY
