#!/usr/bin/env bash
# ejabberd and Skylark side by side, in one run, on this machine's core split
# (server on core 1, load on core 0): idle sessions and memory, 1:1 messages
# among 2,000 online users at rising rates, an offline backlog stored and
# drained. Prints one table with both and the ratio; keeps every raw output.
#
#   bench/peers/ejabberd.sh SKYLARK SKYLARK_LOAD OUT_DIR
#
# RATES (default "2000 3000 4000 6000 8000" msgs/s), SECONDS_PER_RATE of
# traffic (40), IDLE sessions (19500), BACKLOG_USERS (1000) and PER_USER (50)
# change the scenarios. Runs as root. Installs ejabberd and tsung from
# Debian's packages when they are missing; the packaged service is not used.
#
# ejabberd's side: ejabberd 23.01 (bench/peers/ejabberd.yml: plain TCP, no
# shapers, mnesia) loaded by tsung for the message rates, and by
# bench/peers/xmpp.py for idle sessions, the backlog and a latency probe.
# What differs between the two load tools, and how it biases the ratio:
# - tsung is closed-loop per user (send, think, send): when ejabberd falls
#   behind, tsung sends less instead of queueing, and it stamps a message
#   when it writes it, not when it was due. Its achieved rate is reported
#   (the median full 10-s interval of messages received). ejabberd's p50/p99
#   come from xmpp.py's probe, one more pair exchanging 50 msgs/s during the
#   tsung run, timed from each message's due time; tsung itself gives only a
#   mean and a maximum. skylark-load mesh is open-loop, timed from due times,
#   over every message: a stricter measure than a probe.
# - tsung's users send and receive chat messages and nothing else. Skylark's
#   clients also acknowledge each message (an ack frame back), get a SendAck
#   after the fsync, and send and receive delivery receipts: about four
#   frames per message more, which favours ejabberd.
# - ejabberd keeps online messages in memory and writes offline ones to
#   mnesia without an fsync per message; Skylark fsyncs (group commit)
#   before any ack. That favours ejabberd too.
# - The idle and backlog clients differ: xmpp.py (one Python process, SASL
#   PLAIN) against skylark-load (Rust, Ed25519 challenge). The connect rate
#   of ejabberd's idle run is the Python client's limit as much as
#   ejabberd's; its CPU time is printed beside it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../ready.sh"
skylark=$1 load=$2 out=$3
rates=${RATES:-2000 3000 4000 6000 8000}
seconds=${SECONDS_PER_RATE:-40}
idle=${IDLE:-19500}
backlog_users=${BACKLOG_USERS:-1000}
per_user=${PER_USER:-50}
users=2000
here=$(cd "$(dirname "$0")" && pwd)

need() {
  command -v "$1" >/dev/null || { echo "ejabberd.sh: $1 is required${2:+ ($2)}" >&2; exit 1; }
}
for tool in taskset prlimit setpriv curl python3 ss; do need "$tool"; done
# ejabberd runs as its own system user, started with setpriv (which needs root).
[ "$(id -u)" = 0 ] || { echo "ejabberd.sh: run as root (ejabberd is started as the ejabberd user with setpriv)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "ejabberd.sh: /usr/bin/time is required (Debian: apt-get install time)" >&2; exit 1; }
if [ ! -x /usr/sbin/ejabberdctl ] || ! command -v tsung >/dev/null; then
  echo "installing ejabberd and tsung (Debian packages), without starting the packaged service"
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ejabberd tsung >/dev/null || {
    rm -f /usr/sbin/policy-rc.d
    echo "ejabberd.sh: apt-get install ejabberd tsung failed" >&2
    exit 1
  }
  rm -f /usr/sbin/policy-rc.d
fi
if ss -ltn | grep -qE '127\.0\.0\.1:(5222|5281|7480|7481) |\*:(5222|7480|7481) '; then
  echo "ejabberd.sh: a port this run needs (5222, 5281, 7480, 7481) is taken; stop what holds it (ss -ltnp)" >&2
  exit 1
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
ej=$out/ejabberd

# ---- ejabberd ----
ejctl() {
  # setpriv, not su: Debian's su resets the open-files limit (pam_limits).
  (cd "$ej" && prlimit --nofile=20000 taskset -c 1 setpriv --reuid=ejabberd --regid=ejabberd --init-groups \
    env HOME="$ej" /usr/sbin/ejabberdctl --config-dir "$ej" --config "$ej/ejabberd.yml" \
    --ctl-config "$ej/ejabberdctl.cfg" --spool "$ej/db" --logs "$ej/logs" "$@")
}
ej_pid() { pgrep -u ejabberd -f 'beam.smp.*ejabberd-bench@localhost' | head -1; }
ej_start() { # fresh spool, USERS registered
  ej_stop
  rm -rf "$ej" && mkdir -p "$ej/db" "$ej/logs"
  cp "$here/ejabberd.yml" "$ej/"
  cat >"$ej/ejabberdctl.cfg" <<EOF
ERLANG_NODE=ejabberd-bench@localhost
POLL=true
ERL_MAX_PORTS=65536
ERL_PROCESSES=1000000
ERL_OPTIONS="+S 1:1 -env ERL_CRASH_DUMP_BYTES 0"
EJABBERD_PID_PATH=$ej/ejabberd.pid
EOF
  : >"$ej/inetrc"
  chown -R ejabberd:ejabberd "$ej"
  ejctl start
  for _ in $(seq 1 100); do
    curl -sf -X POST http://127.0.0.1:5281/api/status -d '{}' 2>/dev/null | grep -q started && break
    sleep 0.2
  done
  curl -sf -X POST http://127.0.0.1:5281/api/status -d '{}' | grep -q started || {
    echo "ejabberd.sh: ejabberd did not start (see $ej/logs)" >&2
    exit 1
  }
  python3 "$here/xmpp.py" register "$1"
}
ej_stop() {
  local pid
  pid=$(ej_pid || true)
  [ -n "$pid" ] || return 0
  ejctl stop >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
trap 'ej_stop; [ -n "${sk_pid:-}" ] && kill "$sk_pid" 2>/dev/null || true' EXIT

# ---- Skylark ----
pristine=$out/skylark-pristine
if [ ! -d "$pristine" ] || [ ! -f "$out/manifest.json" ]; then
  rm -rf "$pristine"
  "$load" provision --data-dir "$pristine" --accounts 20000 --manifest "$out/manifest.json" >/dev/null
fi
sk_start() {
  rm -rf "$out/skylark-data" && cp -r "$pristine" "$out/skylark-data"
  prlimit --nofile=20000 taskset -c 1 "$skylark" serve --data-dir "$out/skylark-data" --log warn >"$out/skylark.log" 2>&1 &
  sk_pid=$!
  wait_ready http://127.0.0.1:7480/readyz $sk_pid "$out/skylark.log" || exit 1
}
sk_stop() { kill "$sk_pid" 2>/dev/null || true; wait "$sk_pid" 2>/dev/null || true; sk_pid=; }
sk_load() { taskset -c 0 "$load" "$@" --manifest "$out/manifest.json" --tcp 127.0.0.1:7481; }

# ---- idle sessions and memory ----
echo "idle: $idle sessions each"
ej_start "$idle"
taskset -c 0 prlimit --nofile=20000 /usr/bin/time -f '%U %S %e' -o "$out/idle-ejabberd.time" \
  python3 "$here/xmpp.py" idle 1 "$idle" "$(ej_pid)" >"$out/idle-ejabberd.json"
ej_stop
sk_start
taskset -c 0 /usr/bin/time -f '%U %S %e' -o "$out/idle-skylark.time" "$load" idle --connections "$idle" \
  --rate 20000 --sources 80 --workers 2 --server-pid "$sk_pid" --manifest "$out/manifest.json" --tcp 127.0.0.1:7481 \
  --report "$out/idle-skylark.json" >"$out/idle-skylark.txt" 2>&1
sk_stop

# ---- offline backlog: stored, then drained ----
echo "backlog: $backlog_users offline users x $per_user messages each"
ej_start $((2 * backlog_users))
taskset -c 0 prlimit --nofile=20000 python3 "$here/xmpp.py" backlog 1 "$backlog_users" "$per_user" >"$out/backlog-ejabberd.json"
ej_stop
sk_start
sk_load backlog --users "$backlog_users" --per-user "$per_user" --sources 20 --report "$out/backlog-skylark.json" >"$out/backlog-skylark.txt" 2>&1
sk_stop

# ---- 1:1 messages among 2,000 online users, at rising rates ----
for i in $(seq 1 "$users"); do echo "u$i;p$i"; done >"$out/users.csv"
probe_rate=50
for rate in $rates; do
  echo "messages: $rate msgs/s for $seconds s"
  # tsung: every user sends one message every THINK seconds to a random user.
  think=$(python3 -c "print(round($users / $rate, 4))")
  count=$(python3 -c "print(int($seconds * $rate / $users))")
  sed -e "s|@USERS@|$users|g" -e "s|@CSV@|$out/users.csv|" -e "s|@COUNT@|$count|" -e "s|@THINK@|$think|" \
    "$here/tsung-mesh.xml" >"$out/tsung-$rate.xml"
  ej_start $((users + 2))
  pid=$(ej_pid)
  before=$(cpu_ticks "$pid")
  rm -rf "$out/tsung-$rate"
  (taskset -c 0 prlimit --nofile=20000 /usr/bin/time -f '%U %S %e' -o "$out/tsung-$rate.time" \
    tsung -f "$out/tsung-$rate.xml" -l "$out/tsung-$rate" start >"$out/tsung-$rate.txt" 2>&1) &
  tsung_job=$!
  # The probe runs while tsung's users are sending: after their connects
  # (2,000 at 400/s) and for the middle of the traffic.
  sleep 10
  taskset -c 0 python3 "$here/xmpp.py" probe $((users + 1)) $((seconds - 10)) "$probe_rate" >"$out/probe-$rate.json"
  wait "$tsung_job"
  after=$(cpu_ticks "$pid")
  echo "$((after - before))" >"$out/ejabberd-cpu-$rate.ticks"
  ej_stop
  sk_start
  before=$(cpu_ticks "$sk_pid")
  sk_load mesh --users "$users" --rate "$rate" --seconds "$seconds" --sources 10 \
    --report "$out/mesh-$rate.json" >"$out/mesh-$rate.txt" 2>&1
  after=$(cpu_ticks "$sk_pid")
  echo "$((after - before))" >"$out/skylark-cpu-$rate.ticks"
  sk_stop
done

python3 "$here/table.py" "$out" "$rates"
