# Shared by bench/cluster.sh, cluster_scale.sh and cluster_failover.sh: a private
# PostgreSQL, a private NATS server and Skylark nodes from installed
# binaries, all stopped (and their data removed) when the script exits.
# Source it; it defines start_pg, start_nats, start_node,
# start_provisioned_cluster and $work.

pgbin=${SKYLARK_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL's server programs are missing (apt-get install postgresql)" >&2; exit 1; }
nats=${SKYLARK_NATS_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}
[ -x "$nats" ] || { echo "nats-server is missing (apt-get install nats-server)" >&2; exit 1; }

work=$(mktemp -d /tmp/skylark-cluster.XXXXXX)
chmod 755 "$work"
pids=()       # PostgreSQL and NATS
node_pids=()  # the nodes, stopped first (they hand over while the others still serve)
stop() {
  echo; echo "== stopping"
  for pid in "${node_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${node_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT INT TERM

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi

# start_pg PORT [postgres -c settings…]: sets $store to the database URL.
start_pg() {
  local port=$1; shift
  echo "== PostgreSQL on 127.0.0.1:$port (data in $work/pg)"
  mkdir -p "$work/pg"
  if [ ${#as_pg[@]} -gt 0 ]; then chown postgres "$work/pg"; fi
  "${as_pg[@]}" "$pgbin/initdb" -D "$work/pg" -U skylark --auth=trust -E UTF8 --locale=C >/dev/null
  "${as_pg[@]}" "$pgbin/postgres" -D "$work/pg" -p "$port" -k "$work/pg" -c listen_addresses=127.0.0.1 "$@" \
    >"$work/pg.log" 2>&1 &
  pids+=($!)
  until "$pgbin/psql" -h 127.0.0.1 -p "$port" -U skylark -d postgres -qc 'select 1' >/dev/null 2>&1; do sleep 0.2; done
  "$pgbin/psql" -h 127.0.0.1 -p "$port" -U skylark -d postgres -qc 'create database skylark' >/dev/null
  store="postgres://skylark@127.0.0.1:$port/skylark"
}

# start_nats PORT
start_nats() {
  echo "== NATS on 127.0.0.1:$1"
  "$nats" -a 127.0.0.1 -p "$1" >"$work/nats.log" 2>&1 &
  pids+=($!)
}

# start_node BIN INDEX HTTP_PORT TCP_PORT NATS_URL [extra serve flags…]:
# node n$INDEX on 127.0.0.$((INDEX+1)); sets $node_pid (also in $node_pids).
start_node() {
  local bin=$1 i=$2 http=$3 tcp=$4 natsurl=$5; shift 5
  local host=127.0.0.$((i + 1))
  SKYLARK_LOG=${SKYLARK_LOG:-info} "$bin" serve --store "$store" --cluster-node "n$i" \
    --nats "$natsurl" --http "$host:$http" --tcp "$host:$tcp" --admin "$host:${ADMIN_PORT:-7482}" \
    --data-dir "$work/n$i" "$@" \
    >"$work/n$i.out" 2>"$work/n$i.log" &
  node_pid=$!
  node_pids+=($node_pid)
  until grep -q "Skylark is running" "$work/n$i.out" 2>/dev/null; do
    kill -0 "$node_pid" 2>/dev/null || { echo "node n$i did not start:" >&2; tail "$work/n$i.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "== node n$i: http://$host:$http (TCP $host:$tcp; admin and metrics http://$host:${ADMIN_PORT:-7482}); log $work/n$i.log"
}

# start_provisioned_cluster ACCOUNTS NODES: ACCOUNTS test accounts written
# with skylark-load into an embedded store and copied into a private
# PostgreSQL, NATS, and NODES quiet nodes (ports $HTTP_PORT, $TCP_PORT);
# the manifest goes to $OUT/manifest.json. Needs $bin and $load.
start_provisioned_cluster() {
  local accounts=$1 nodes=$2
  echo "== provisioning $accounts accounts (embedded store, then copied into PostgreSQL)"
  "$load" provision --data-dir "$work/seed" --accounts "$accounts" --manifest "$OUT/manifest.json" >/dev/null
  start_pg 55432 -c max_connections=300 -c shared_buffers=512MB
  "$bin" store copy --from "$work/seed" --to "$store" | tail -1
  start_nats 54222
  for ((i = 0; i < nodes; i++)); do
    SKYLARK_LOG=warn start_node "$bin" "$i" "$HTTP_PORT" "$TCP_PORT" "nats://127.0.0.1:54222"
  done
  sleep 3
}
