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

pgbin=${SKYLARK_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL's server programs are missing (apt-get install postgresql)" >&2; exit 1; }
nats=${SKYLARK_NATS_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}
[ -x "$nats" ] || { echo "nats-server is missing (apt-get install nats-server)" >&2; exit 1; }

echo "== building skylark (release)"
cargo build --release -q -p skylark
bin=${CARGO_TARGET_DIR:-target}/release/skylark

work=$(mktemp -d /tmp/skylark-cluster.XXXXXX)
chmod 755 "$work"
pids=()
stop() {
  echo; echo "== stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT INT TERM

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi

echo "== PostgreSQL on 127.0.0.1:$PG_PORT (data in $work/pg)"
mkdir -p "$work/pg" && [ ${#as_pg[@]} -eq 0 ] || chown postgres "$work/pg"
"${as_pg[@]}" "$pgbin/initdb" -D "$work/pg" -U skylark --auth=trust -E UTF8 --locale=C >/dev/null
"${as_pg[@]}" "$pgbin/postgres" -D "$work/pg" -p "$PG_PORT" -k "$work/pg" -c listen_addresses=127.0.0.1 \
  >"$work/pg.log" 2>&1 &
pids+=($!)
until "$pgbin/psql" -h 127.0.0.1 -p "$PG_PORT" -U skylark -d postgres -qc 'select 1' >/dev/null 2>&1; do sleep 0.2; done
"$pgbin/psql" -h 127.0.0.1 -p "$PG_PORT" -U skylark -d postgres -qc 'create database skylark' >/dev/null
store="postgres://skylark@127.0.0.1:$PG_PORT/skylark"

echo "== NATS on 127.0.0.1:$NATS_PORT"
"$nats" -a 127.0.0.1 -p "$NATS_PORT" >"$work/nats.log" 2>&1 &
pids+=($!)

for ((i = 0; i < NODES; i++)); do
  host=127.0.0.$((i + 1))
  SKYLARK_LOG=${SKYLARK_LOG:-info} "$bin" serve --store "$store" --cluster-node "n$i" \
    --nats "nats://127.0.0.1:$NATS_PORT" --http "$host:$HTTP_PORT" --tcp "$host:$TCP_PORT" \
    --data-dir "$work/n$i" >"$work/n$i.out" 2>"$work/n$i.log" &
  pids+=($!)
  until grep -q "Skylark is running" "$work/n$i.out" 2>/dev/null; do
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "node n$i did not start:" >&2; tail "$work/n$i.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "== node n$i: http://$host:$HTTP_PORT (TCP $host:$TCP_PORT); log $work/n$i.log"
done

echo
"$bin" cluster status --store "$store"
echo
echo "Try it: open http://127.0.0.1:$HTTP_PORT/ and http://127.0.0.2:$HTTP_PORT/ in two browser windows,"
echo "or register with the CLI against any node. Drain a node with:"
echo "  $bin cluster drain n1 --store $store"
echo "Ctrl-C stops the cluster."
wait
