#!/usr/bin/env bash
# A/B run of two server binaries with one load tool, interleaved, on this
# machine's core split (server on core 1, load on core 0), each run on a
# fresh copy of the same provisioned data. Prints one line per run (for chat
# and mesh, with the server's CPU time per delivered message, a steadier
# figure than tail latency on this machine) and keeps every JSON report.
#
#   bench/ab.sh BEFORE_SKYLARK AFTER_SKYLARK SKYLARK_LOAD OUT_DIR [ROUNDS]
#
# For example, against the commit before a change:
#   git worktree add /tmp/before <commit> && (cd /tmp/before &&
#     CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p skylark)
#   cargo build --release -p skylark -p skylark-load
#   bench/ab.sh /tmp/before-target/release/skylark target/release/skylark \
#     target/release/skylark-load target/ab
#
# The scenarios are the ones docs/BENCHMARKS.md reports A/B for: idle memory
# (19,500 TCP connections), 1:1 chat at two rates, and a 1,024-member group.
# SCENARIOS picks some of them (default: "idle chat3000 chat4000 group");
# connects is the idle ramp as fast as the server takes it (connects/s);
# chat and mesh lines also give the server's context switches per message
# (all its threads, from /proc/PID/task/*/status);
# chatN is 1:1 chat at N messages per second (200 pairs), for any N; meshN
# is N messages per second among 2,000 online users, each to a random other,
# for MESH_SECS seconds (default 10; a server can hold a rate for 10 s and
# fall behind over 40 as its store grows, docs/BENCHMARKS.md).
# BEFORE_ARGS and AFTER_ARGS add load-tool flags to one side, to compare
# loads on one binary; for example the payload of an end-to-end encrypted
# 100-byte text against the text itself:
#   SCENARIOS=mesh4000 BEFORE_ARGS="--payload 100" AFTER_ARGS="--payload 260" \
#     bench/ab.sh target/release/skylark target/release/skylark target/release/skylark-load target/ab-e2ee
# BEFORE_TLS=1 and AFTER_TLS=1 run that side's server with --dev-tls and its
# clients over TLS (trusting the server's own certificate); for example the
# memory of an idle connection over TLS against plain TCP:
#   SCENARIOS=idle AFTER_TLS=1 bench/ab.sh target/release/skylark target/release/skylark \
#     target/release/skylark-load target/ab-tls
# When the store's format changed between the two binaries, PROVISION_WITH
# names the before commit's skylark-load, which writes accounts the before
# server can read (the after server upgrades them as it starts).
# BEFORE_ENV and AFTER_ENV set environment variables for one side's server,
# as NAME=VALUE words; for example an experiment's switch (bench/experiments):
#   SCENARIOS=mesh5000 MESH_SECS=40 AFTER_ENV=SKX_APPEND_ONLY=/tmp/side.bin bench/ab.sh ...
# SERVER_CONFIG=FILE starts both servers with that configuration file, and
# SETTLE=SECONDS has idle runs read the server's memory again that long after
# the ramp (every connection still open); for example the memory once idle
# devices' actors have stopped:
#   printf '[messaging]\nactor_idle_ms = 10000\n' > /tmp/sleep.toml
#   SCENARIOS=idle SETTLE=20 SERVER_CONFIG=/tmp/sleep.toml bench/ab.sh ...
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ready.sh"
before=$1 after=$2 load=$3 out=$4 rounds=${5:-2}
scenarios=" ${SCENARIOS:-idle chat3000 chat4000 group} "
for tool in taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "ab.sh: $tool is required" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
pristine=$out/pristine
if [ ! -d "$pristine" ] || [ ! -f "$out/manifest.json" ]; then
  rm -rf "$pristine"
  "${PROVISION_WITH:-$load}" provision --data-dir "$pristine" --accounts 20000 --manifest "$out/manifest.json" >/dev/null
fi

serve() { # binary tls(0/1) environment
  rm -rf "$out/data"
  cp -r "$pristine" "$out/data"
  local scheme=http flags=()
  [ "$2" = 1 ] && scheme=https flags=(--dev-tls)
  [ -n "${SERVER_CONFIG:-}" ] && flags+=(--config "$SERVER_CONFIG")
  # shellcheck disable=SC2086 # NAME=VALUE words, split on spaces, as written
  env $3 taskset -c 1 "$1" serve --data-dir "$out/data" --log warn "${flags[@]}" >"$out/server.log" 2>&1 &
  pid=$!
  wait_ready "$scheme://127.0.0.1:7480/readyz" $pid "$out/server.log" || exit 1
}

# Every thread's voluntary and involuntary context switches so far.
context_switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'
}

stop() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

scenario() { # label binary name args...
  local label=$1 bin=$2 name=$3
  shift 3
  [[ "$scenarios" == *" $name "* ]] || return 0
  local tls vars
  [ "$label" = before ] && tls=${BEFORE_TLS:-0} || tls=${AFTER_TLS:-0}
  [ "$label" = before ] && vars=${BEFORE_ENV:-} || vars=${AFTER_ENV:-}
  serve "$bin" "$tls" "$vars"
  local report="$out/$name-$label-$round.json"
  local extra=()
  [ "$tls" = 1 ] && extra=(--ca "$out/data/dev-tls/cert.pem")
  [ "$name" = idle ] && extra+=(--server-pid "$pid" --settle-secs "${SETTLE:-0}")
  if [ "$name" != idle ] && [ "$name" != connects ]; then
    local sided
    [ "$label" = before ] && sided=${BEFORE_ARGS:-} || sided=${AFTER_ARGS:-}
    # shellcheck disable=SC2206 # flags split on spaces, as written
    extra+=($sided)
  fi
  local ticks switches
  ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  switches=$(context_switches "$pid")
  taskset -c 0 "$load" "${@}" --manifest "$out/manifest.json" --tcp 127.0.0.1:7481 \
    --report "$report" "${extra[@]}" >"$out/$name-$label-$round.txt" 2>&1 || {
    echo "ab.sh: $name on $label failed (see $out/$name-$label-$round.txt)" >&2
  }
  ticks=$(($(awk '{print $14 + $15}' "/proc/$pid/stat") - ticks))
  switches=$(($(context_switches "$pid") - switches))
  stop
  # The server's CPU time during the scenario, per message delivered (chat,
  # mesh) or per connection (connects, with the rate the ramp reached).
  local per
  per=$(python3 -c 'import json, os, sys
r = json.load(open(sys.argv[1]))
cpu = int(sys.argv[2]) / os.sysconf("SC_CLK_TCK") * 1e6
if sys.argv[3] == "connects":
    print("%.0f connects/s, %.0f us of server CPU per connection" % (r["connects_per_second"], cpu / r["connections"]))
elif r.get("delivered"):
    print("%.0f us of server CPU and %.1f context switches per delivered message"
          % (cpu / r["delivered"], int(sys.argv[4]) / r["delivered"]))' \
    "$report" "$ticks" "$name" "$switches" 2>/dev/null || true)
  echo "$name $label round $round: $report${per:+ ($per)}"
}

for round in $(seq 1 "$rounds"); do
  for pair in "before $before" "after $after"; do
    set -- $pair
    label=$1 bin=$2
    scenario "$label" "$bin" idle idle --connections 19500 --rate 4000 --sources 80 --workers 2
    # As fast as the server accepts them (it is the limit, not the asked rate).
    scenario "$label" "$bin" connects idle --connections 19500 --rate 30000 --sources 80 --workers 2 --hold-secs 1
    for name in $scenarios; do
      if [[ "$name" =~ ^chat([0-9]+)$ ]]; then
        scenario "$label" "$bin" "$name" chat --pairs 200 --rate "${BASH_REMATCH[1]}" --seconds 10 --sources 4
      elif [[ "$name" =~ ^mesh([0-9]+)$ ]]; then
        scenario "$label" "$bin" "$name" mesh --users 2000 --rate "${BASH_REMATCH[1]}" --seconds "${MESH_SECS:-10}" --sources 10
      fi
    done
    scenario "$label" "$bin" group group --sources 8 --members 1024 --messages 100 --rate 10
  done
done
