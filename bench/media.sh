#!/usr/bin/env bash
# Attachments' throughput, one run: a file uploaded to Skylark the way the
# clients do it (tus: one POST, then PATCHes of 4 MiB, each fsync'd before
# it is answered) and downloaded back, with curl; against copying the same
# file with cp (and syncing it) and serving it with nginx. Server on core 1,
# curl on core 0. Server CPU per GB from /proc/PID/stat (user + system).
#
#   bench/media.sh SKYLARK SKYLARK_LOAD OUT_DIR [SIZE_MB]
#
#   cargo build --release -p skylark -p skylark-load
#   bench/media.sh target/release/skylark target/release/skylark-load target/media 512
#
# The file is random bytes (as a client's ciphertext is): the figures leave
# out the clients' encryption, which the clients pay, not the server.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ready.sh"
skylark=$1 load=$2 out=$3 size_mb=${4:-256}
for tool in taskset curl split; do
  command -v "$tool" >/dev/null || { echo "media.sh: $tool is required" >&2; exit 1; }
done
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "media.sh: nginx is missing; installing Debian's package nginx"
  (apt-get update -qq && apt-get install -y -qq nginx) >/dev/null || { echo "media.sh: could not install nginx" >&2; exit 1; }
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
mkdir -p "$out"
out=$(cd "$out" && pwd)
hz=$(getconf CLK_TCK)
bytes=$((size_mb * 1024 * 1024))

rm -rf "$out/data" "$out/chunks" "$out/www"
"$load" provision --data-dir "$out/data" --accounts 1 --manifest "$out/manifest.json" >/dev/null
mkdir -p "$out/chunks" "$out/www"
head -c "$bytes" /dev/urandom >"$out/www/file.bin"
(cd "$out/chunks" && split -b 4M -d -a 4 "$out/www/file.bin" part.)

cpu_ticks() { # pid...
  local total=0
  for p in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
now() { date +%s.%N; }
rate() { # seconds → MB/s
  awk -v b="$bytes" -v s="$1" 'BEGIN { printf "%.0f", b / 1e6 / s }'
}
cpu_per_gb() { # ticks
  awk -v t="$1" -v hz="$hz" -v b="$bytes" 'BEGIN { printf "%.2f", t / hz / (b / 1e9) }'
}

# The default largest file is 100 MiB: room for this one.
printf '[media]\nmax_upload_bytes = %s\ndaily_quota_bytes = %s\n' "$bytes" "$((bytes * 4))" >"$out/skylark.toml"
taskset -c 1 "$skylark" serve --config "$out/skylark.toml" --data-dir "$out/data" --log warn >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; [ -n "${nginx_pid:-}" ] && kill $nginx_pid 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:7480/readyz $pid "$out/server.log" || exit 1
token=$(taskset -c 0 "$load" media-token --manifest "$out/manifest.json" --server http://127.0.0.1:7480)
auth=(-H "Authorization: Bearer $token" -H "Tus-Resumable: 1.0.0")

# Upload: POST, then the chunks in order.
c0=$(cpu_ticks "$pid"); t0=$(now)
location=$(taskset -c 0 curl -sf -D - -o /dev/null -X POST "${auth[@]}" -H "Upload-Length: $bytes" \
  http://127.0.0.1:7480/v1/uploads | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
offset=0
for chunk in "$out"/chunks/part.*; do
  offset=$(taskset -c 0 curl -sf -D - -o /dev/null -X PATCH "${auth[@]}" -H "Upload-Offset: $offset" \
    -H "Content-Type: application/offset+octet-stream" --data-binary "@$chunk" \
    "http://127.0.0.1:7480$location" | tr -d '\r' | sed -n 's/^[Uu]pload-[Oo]ffset: //p')
done
t1=$(now); c1=$(cpu_ticks "$pid")
[ "$offset" = "$bytes" ] || { echo "media.sh: the upload ended at $offset of $bytes bytes" >&2; exit 1; }
up_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
up_cpu=$((c1 - c0))

# Download, whole.
id=${location##*/}
c0=$(cpu_ticks "$pid"); t0=$(now)
taskset -c 0 curl -sf -o "$out/back.bin" -H "Authorization: Bearer $token" "http://127.0.0.1:7480/v1/blobs/$id"
t1=$(now); c1=$(cpu_ticks "$pid")
cmp -s "$out/back.bin" "$out/www/file.bin" || { echo "media.sh: the download differs from the upload" >&2; exit 1; }
down_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
down_cpu=$((c1 - c0))
rm -f "$out/back.bin"

# cp, and sync (an upload is durable when answered; so is this copy).
t0=$(now)
taskset -c 1 cp "$out/www/file.bin" "$out/copy.bin"
sync "$out/copy.bin"
t1=$(now)
cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
rm -f "$out/copy.bin"

# nginx serving the same file (one worker on core 1).
cat >"$out/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $out/nginx.pid;
error_log $out/nginx.err warn;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  server {
    listen 127.0.0.1:7490;
    root $out/www;
  }
}
EOF
taskset -c 1 "$nginx_bin" -c "$out/nginx.conf" -p "$out" &
nginx_pid=$!
for _ in $(seq 1 50); do
  curl -sf -o /dev/null -r 0-0 http://127.0.0.1:7490/file.bin && break
  sleep 0.1
done
workers=$(pgrep -P "$nginx_pid" || true)
c0=$(cpu_ticks "$nginx_pid" $workers); t0=$(now)
taskset -c 0 curl -sf -o /dev/null http://127.0.0.1:7490/file.bin
t1=$(now); c1=$(cpu_ticks "$nginx_pid" $workers)
ng_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
ng_cpu=$((c1 - c0))

printf '%s MiB file, %s\n' "$size_mb" "$(date -u +%Y-%m-%d)"
printf '| what | MB/s | server CPU s per GB |\n| --- | --- | --- |\n'
printf '| Skylark upload (tus, 4 MiB PATCHes, each fsync'"'"'d) | %s | %s |\n' "$(rate "$up_s")" "$(cpu_per_gb "$up_cpu")"
printf '| Skylark download | %s | %s |\n' "$(rate "$down_s")" "$(cpu_per_gb "$down_cpu")"
printf '| cp + sync (same disk) | %s | — |\n' "$(rate "$cp_s")"
printf '| nginx serving the file (sendfile) | %s | %s |\n' "$(rate "$ng_s")" "$(cpu_per_gb "$ng_cpu")"
