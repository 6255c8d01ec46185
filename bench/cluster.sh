#!/usr/bin/env bash
# A local Skylark cluster in one command: a private PostgreSQL, a private
# NATS server and three nodes on 127.0.0.1, .2 and .3, all from installed
# binaries (docs/CLUSTER.md). Ctrl-C stops everything and removes the data.
#
#   bench/cluster.sh            # nodes n0 n1 n2; HTTP on 127.0.0.{1,2,3}:7480
#   NODES=5 bench/cluster.sh    # more nodes
#
# Needs: PostgreSQL's server programs (Debian: postgresql), nats-server
# (Debian: nats-server), and a Rust toolchain to build Skylark.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-3}
PG_PORT=${PG_PORT:-55432}
NATS_PORT=${NATS_PORT:-54222}
HTTP_PORT=${HTTP_PORT:-7480}
TCP_PORT=${TCP_PORT:-7481}

echo "== building skylark (release)"
cargo build --release -q -p skylark
bin=${CARGO_TARGET_DIR:-target}/release/skylark

. bench/cluster_lib.sh
start_pg "$PG_PORT"
start_nats "$NATS_PORT"
for ((i = 0; i < NODES; i++)); do
  start_node "$bin" "$i" "$HTTP_PORT" "$TCP_PORT" "nats://127.0.0.1:$NATS_PORT"
done

echo
"$bin" cluster status --store "$store"
echo
servers=$(for ((i = 0; i < NODES; i++)); do printf 'http://127.0.0.%d:%d,' $((i + 1)) "$HTTP_PORT"; done)
echo "Try it: open http://127.0.0.1:$HTTP_PORT/ and http://127.0.0.2:$HTTP_PORT/ in two browser windows, or"
echo "  $bin register +15551234567 --server ${servers%,}"
echo "(the SMS code is printed in $work/n0.log). Drain a node with:"
echo "  $bin cluster drain n1 --store $store"
echo "Ctrl-C stops the cluster."
wait
