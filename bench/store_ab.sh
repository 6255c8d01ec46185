#!/usr/bin/env bash
# A/B of the two stores with one server binary: the embedded redb store
# against PostgreSQL, the same scenarios, interleaved, on this machine's
# core split (server on core 1, load on core 0). PostgreSQL is a throwaway
# cluster made here (initdb from /usr/lib/postgresql/*/bin or SKYLARK_PG_BIN)
# and pinned to PG_CORE (default 1: it shares the server's core, so both
# stores get one core for everything behind the socket). Each run starts
# from the same provisioned accounts: a copy of the redb file, or a fresh
# database filled from it with `skylark store copy`.
#
#   bench/store_ab.sh SKYLARK SKYLARK_LOAD OUT_DIR [ROUNDS]
#
#   cargo build --release -p skylark -p skylark-load
#   bench/store_ab.sh target/release/skylark target/release/skylark-load target/store-ab
#
# Prints one line per run and a summary; keeps every JSON report. RATES
# (default "2000 3000 4000") sets the chat rates; NO_BACKLOG=1 skips the
# backlog scenario. Commits and rows per message are the server's own
# counts (/metrics) over the whole run, connecting included; rows are
# counted by the PostgreSQL store only.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ready.sh"
skylark=$1 load=$2 out=$3 rounds=${4:-2}
pg_core=${PG_CORE:-1}
for tool in taskset curl jq; do
  command -v "$tool" >/dev/null || { echo "store_ab.sh: $tool is required" >&2; exit 1; }
done
bin=${SKYLARK_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$bin/initdb" ] || { echo "store_ab.sh: PostgreSQL's initdb not found (install postgresql or set SKYLARK_PG_BIN)" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
skylark=$(cd "$(dirname "$skylark")" && pwd)/$(basename "$skylark")
load=$(cd "$(dirname "$load")" && pwd)/$(basename "$load")

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg=()
if [ "$(id -u)" = 0 ]; then
  as_pg=(setpriv --reuid="$(id -u postgres)" --regid="$(id -g postgres)" --clear-groups)
fi
pg_port=55432
pg_dir=$out/pg
pg_start() {
  if "$bin/pg_isready" -q -h 127.0.0.1 -p $pg_port; then
    echo "store_ab.sh: something already answers on port $pg_port; stop it first" >&2
    exit 1
  fi
  if [ ! -d "$pg_dir/data" ]; then
    mkdir -p "$pg_dir"
    [ ${#as_pg[@]} -gt 0 ] && chown postgres:postgres "$pg_dir"
    "${as_pg[@]}" "$bin/initdb" -D "$pg_dir/data" -U skylark --auth=trust -E UTF8 --locale=C >"$pg_dir/initdb.log"
  fi
  taskset -c "$pg_core" "${as_pg[@]}" "$bin/postgres" -D "$pg_dir/data" -p $pg_port -k "$pg_dir" \
    -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c max_connections=200 \
    -c shared_buffers=256MB >"$pg_dir/server.log" 2>&1 &
  pg_pid=$!
  for _ in $(seq 1 100); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p $pg_port && return 0
    sleep 0.1
  done
  echo "store_ab.sh: PostgreSQL did not start (see $pg_dir/server.log)" >&2
  exit 1
}
psql_() { "$bin/psql" -X -q -h 127.0.0.1 -p $pg_port -U skylark -d postgres -c "$1"; }
pg_start
trap 'kill $pg_pid 2>/dev/null || true' EXIT

pristine=$out/pristine
if [ ! -d "$pristine" ] || [ ! -f "$out/manifest.json" ]; then
  rm -rf "$pristine"
  "$load" provision --data-dir "$pristine" --accounts 20000 --manifest "$out/manifest.json" >/dev/null
fi
url="postgres://skylark@127.0.0.1:$pg_port/bench"

serve() { # store
  rm -rf "$out/data"
  cp -r "$pristine" "$out/data"
  local store=()
  if [ "$1" = postgres ]; then
    psql_ "DROP DATABASE IF EXISTS bench" >/dev/null
    psql_ "CREATE DATABASE bench" >/dev/null
    "$skylark" store copy --from "$pristine" --to "$url" >"$out/copy.log"
    store=(--store "$url")
  fi
  taskset -c 1 "$skylark" serve --data-dir "$out/data" "${store[@]}" --log warn >"$out/server.log" 2>&1 &
  pid=$!
  wait_ready http://127.0.0.1:7480/readyz $pid "$out/server.log" || exit 1
}

stop() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

scenario() { # store name args...
  local store=$1 name=$2
  shift 2
  serve "$store"
  local report="$out/$name-$store-$round.json"
  taskset -c 0 "$load" "${@}" --manifest "$out/manifest.json" --tcp 127.0.0.1:7481 \
    --report "$report" >"$out/$name-$store-$round.txt" 2>&1 || {
    echo "store_ab.sh: $name on $store failed (see $out/$name-$store-$round.txt)" >&2
  }
  # Group commits and rows written, as the server counted them.
  curl -sf http://127.0.0.1:7482/metrics | awk '
    /^skylark_store_commit_batch_writes_count/ { c = $2 }
    /^skylark_store_rows_written_total/ { r = $2 }
    END { printf "%s %s\n", c + 0, r + 0 }' >"$out/$name-$store-$round.commits"
  stop
  echo "$name $store round $round: $report"
}

rates=${RATES:-2000 3000 4000}
for round in $(seq 1 "$rounds"); do
  for store in redb postgres; do
    for rate in $rates; do
      scenario "$store" "chat$rate" chat --pairs 200 --rate "$rate" --seconds 10 --sources 4
    done
    [ -n "${NO_BACKLOG:-}" ] || scenario "$store" backlog backlog --users 1000 --per-user 50 --sources 8
  done
done

echo
echo "scenario  store     round  acked/s  ack p99 ms  deliver p50 / p99 ms  | backlog stored/s  drain s  | commits/msg  rows/msg"
for f in "$out"/*-*-*.json; do
  base=$(basename "$f" .json)
  IFS=- read -r name store round <<<"$base"
  per=""
  if [ -f "$out/$base.commits" ]; then
    read -r commits rows <"$out/$base.commits"
    msgs=$(jq -r '.acked // .messages' "$f")
    per=$(awk -v c="$commits" -v r="$rows" -v m="$msgs" 'BEGIN { if (m > 0) printf "%.3f  %.2f", c/m, r/m }')
  fi
  if [ "$name" = backlog ]; then
    jq -r --arg n "$name" --arg s "$store" --arg r "$round" --arg per "$per" \
      '"\($n)  \($s)  \($r)  -  -  -  | \(.stored_per_second|floor)  \(.drain_seconds*100|floor/100)  | \($per)"' "$f"
  else
    jq -r --arg n "$name" --arg s "$store" --arg r "$round" --arg per "$per" \
      '"\($n)  \($s)  \($r)  \(.acked_per_second|floor)  \(.send_to_ack.p99_ms)  \(.send_to_deliver.p50_ms) / \(.send_to_deliver.p99_ms)  |  -  -  | \($per)"' "$f"
  fi
done
