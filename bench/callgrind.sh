#!/usr/bin/env bash
# CPU instructions per delivered 1:1 message, counted by valgrind's
# callgrind: repeatable for the same binary and input whatever else the
# machine is doing (wall-clock figures on this shared box are not).
#
# The server runs under callgrind twice, with the same online pairs for the
# same time, at a low and a high message rate. The difference in
# instructions over the difference in messages delivered is what one more
# message costs the server — accept, store, forward, store at the
# recipient, deliver to the recipient's device and to the sender's own,
# acks and receipts — with start-up, connects, heartbeats, timers and
# shutdown cancelled out.
#
#   bench/callgrind.sh SKYLARK SKYLARK_LOAD OUT_DIR [PAIRS LOW HIGH SECONDS]
#
# For a before/after figure, run it on both binaries (built from the two
# commits, as for bench/ab.sh) with one load tool, and compare the last
# line. When the store's format changed between them, set PROVISION_WITH
# to the before commit's skylark-load, which writes accounts the before
# server can read.
#
# TOOL=dhat counts heap allocations instead (valgrind's DHAT): blocks and
# bytes allocated per delivered message, by the same difference.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ready.sh"
tool=${TOOL:-callgrind}
case "$tool" in callgrind | dhat) ;; *) echo "callgrind.sh: TOOL is callgrind or dhat" >&2; exit 1 ;; esac
server=$1 load=$2 out=$3 pairs=${4:-20} low=${5:-3} high=${6:-12} seconds=${7:-30}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is required (Debian: apt-get install valgrind)" >&2; exit 1; }
command -v curl >/dev/null || { echo "callgrind.sh: curl is required" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
http=127.0.0.1:17480 tcp=127.0.0.1:17481 admin=127.0.0.1:17482
pristine=$out/pristine
if [ ! -d "$pristine" ] || [ ! -f "$out/manifest.json" ]; then
  rm -rf "$pristine"
  "${PROVISION_WITH:-$load}" provision --data-dir "$pristine" --accounts $((2 * pairs)) --manifest "$out/manifest.json" >/dev/null
fi

run() { # rate → prints "instructions delivered"
  local rate=$1
  rm -rf "$out/data" "$out"/callgrind.out.* "$out"/dhat.out.*
  cp -r "$pristine" "$out/data"
  local counting=(--tool=callgrind --callgrind-out-file="$out/callgrind.out.%p")
  [ "$tool" = dhat ] && counting=(--tool=dhat --dhat-out-file="$out/dhat.out.%p")
  valgrind "${counting[@]}" \
    "$server" serve --data-dir "$out/data" --http $http --tcp $tcp --admin $admin --log warn \
    >"$out/server-$rate.log" 2>&1 &
  local pid=$!
  # Under valgrind the server starts slowly.
  wait_ready "http://$http/readyz" $pid "$out/server-$rate.log" 120 || { kill $pid 2>/dev/null; exit 1; }
  "$load" chat --manifest "$out/manifest.json" --tcp $tcp --pairs "$pairs" --rate "$rate" --seconds "$seconds" \
    >"$out/chat-$rate.txt" 2>&1 || { echo "callgrind.sh: the load failed (see $out/chat-$rate.txt)" >&2; kill $pid; exit 1; }
  kill -TERM $pid
  wait $pid || true
  local delivered
  delivered=$(grep -o 'delivered [0-9]*' "$out/chat-$rate.txt" | head -1 | awk '{print $2}')
  if [ "$tool" = dhat ]; then
    # DHAT's summary on exit: "Total:     BYTES bytes in BLOCKS blocks".
    local total
    total=$(grep -h 'Total:' "$out/server-$rate.log" | head -1 | tr -d ',' | awk '{print $3, $6}')
    cp "$out"/dhat.out.* "$out/rate-$rate.dhat" 2>/dev/null || true
    echo "$total $delivered"
    return
  fi
  local ir
  ir=$(grep -h '^summary:' "$out"/callgrind.out.* | awk '{s += $2} END {print s}')
  cp "$out"/callgrind.out.* "$out/rate-$rate.callgrind" 2>/dev/null || true
  echo "$ir $delivered"
}

if [ "$tool" = dhat ]; then
  read -r bytes_low blocks_low n_low < <(run "$low")
  read -r bytes_high blocks_high n_high < <(run "$high")
  echo "rate $low/s: $blocks_low allocations ($bytes_low bytes), $n_low messages delivered"
  echo "rate $high/s: $blocks_high allocations ($bytes_high bytes), $n_high messages delivered"
  [ "$n_high" -gt "$n_low" ] || { echo "callgrind.sh: the high rate delivered no more messages than the low one" >&2; exit 1; }
  echo "allocations per delivered message: $(( (blocks_high - blocks_low) / (n_high - n_low) ))"
  echo "bytes allocated per delivered message: $(( (bytes_high - bytes_low) / (n_high - n_low) ))"
  exit 0
fi
read -r ir_low n_low < <(run "$low")
read -r ir_high n_high < <(run "$high")
echo "rate $low/s: $ir_low instructions, $n_low messages delivered"
echo "rate $high/s: $ir_high instructions, $n_high messages delivered"
if [ "$n_high" -le "$n_low" ]; then
  echo "callgrind.sh: the high rate delivered no more messages than the low one" >&2
  exit 1
fi
echo "instructions per delivered message: $(( (ir_high - ir_low) / (n_high - n_low) ))"
