#!/usr/bin/env bash
# The server's side of a membership change in a 1,024-device encrypted
# group whose commit travels as a file (docs/PROTOCOL.md, "Commits too
# large for one post"): every member downloads the commit's blob at about
# the same time. One blob of SIZE bytes (83 KB: removing or adding a device
# at 1,024, docs/BENCHMARKS.md) uploaded as the clients do, then fetched
# COUNT times by curl, PARALLEL at once, each request authenticated with a
# media token. Server on core 1, curl on core 0; server CPU from
# /proc/PID/stat (user + system).
#
#   bench/commit-blobs.sh SKYLARK SKYLARK_LOAD OUT_DIR [COUNT] [PARALLEL] [SIZE]
#
#   cargo build --release -p skylark -p skylark-load
#   bench/commit-blobs.sh target/release/skylark target/release/skylark-load target/commit-blobs 1024 64
#
# One account downloads its own upload here, where the members of a group
# each download one shared with their group: the server checks the token
# and the blob's references the same way, and the group's membership once
# more, which this run leaves out.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ready.sh"
skylark=$1 load=$2 out=$3 count=${4:-1024} parallel=${5:-64} size=${6:-85100}
for tool in taskset curl; do
  command -v "$tool" >/dev/null || { echo "commit-blobs.sh: $tool is required" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
hz=$(getconf CLK_TCK)
rm -rf "$out/data"
"$load" provision --data-dir "$out/data" --accounts 1 --manifest "$out/manifest.json" >/dev/null
head -c "$size" /dev/urandom >"$out/commit.bin"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }

taskset -c 1 "$skylark" serve --data-dir "$out/data" --log warn >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:7480/readyz $pid "$out/server.log" || exit 1
token=$(taskset -c 0 "$load" media-token --manifest "$out/manifest.json" --server http://127.0.0.1:7480)
auth=(-H "Authorization: Bearer $token")

location=$(curl -sf -D - -o /dev/null -X POST "${auth[@]}" -H "Tus-Resumable: 1.0.0" -H "Upload-Length: $size" \
  http://127.0.0.1:7480/v1/uploads | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
curl -sf -o /dev/null -X PATCH "${auth[@]}" -H "Tus-Resumable: 1.0.0" -H "Upload-Offset: 0" \
  -H "Content-Type: application/offset+octet-stream" --data-binary "@$out/commit.bin" "http://127.0.0.1:7480$location"
id=${location##*/}

# One curl, COUNT transfers, PARALLEL at a time; each must answer 200 with
# the whole blob.
config="$out/curl.conf"
: >"$config"
for i in $(seq 1 "$count"); do
  printf 'url = "http://127.0.0.1:7480/v1/blobs/%s"\noutput = "%s/got.%s"\n' "$id" "$out" "$((i % 4))" >>"$config"
done
c0=$(cpu_ticks "$pid"); t0=$(now)
taskset -c 0 curl -sf --no-progress-meter --parallel --parallel-max "$parallel" "${auth[@]}" -w '%{http_code} %{size_download}\n' \
  -K "$config" >"$out/answers.txt"
t1=$(now); c1=$(cpu_ticks "$pid")
ok=$(awk -v s="$size" '$1 == 200 && $2 == s' "$out/answers.txt" | wc -l)
[ "$ok" = "$count" ] || { echo "commit-blobs.sh: $ok of $count downloads came back whole" >&2; exit 1; }
cmp -s "$out/got.1" "$out/commit.bin" || { echo "commit-blobs.sh: a download differs from the upload" >&2; exit 1; }
rm -f "$out"/got.*

awk -v n="$count" -v p="$parallel" -v s="$size" -v a="$t0" -v b="$t1" -v t="$((c1 - c0))" -v hz="$hz" -v day="$(date -u +%F)" 'BEGIN {
  secs = b - a
  printf "%d downloads of %d bytes, %d at a time, %s\n", n, s, p, day
  printf "| downloads | all done in | downloads/s | MB/s | server CPU per download |\n| ---: | ---: | ---: | ---: | ---: |\n"
  printf "| %d | %.2f s | %.0f | %.0f | %.2f ms |\n", n, secs, n / secs, n * s / 1e6 / secs, t / hz * 1000 / n
}'
