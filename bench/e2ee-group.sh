#!/usr/bin/env bash
# An end-to-end encrypted group of MEMBERS devices against a real server,
# every member a full SDK device (skylark_client::e2ee::Crypto, its MLS
# state written durably in its own profile directory, as the CLI keeps it),
# all in one skylark-load process on core 0, the server on core 1:
# starting the group's encryption (claims, adds 32 per commit, Welcomes as
# files), a message to every member, a removal, FIRST_POSTS members posting
# for the first time (each commits fresh keys first), another removal.
#
#   bench/e2ee-group.sh SKYLARK SKYLARK_LOAD OUT_DIR [MEMBERS] [FIRST_POSTS]
#
#   cargo build --release -p skylark -p skylark-load
#   bench/e2ee-group.sh target/release/skylark target/release/skylark-load target/e2ee-group 1024 16
#
# The server's claim limit is raised for the run (the creator claims every
# member's key package; at the default 60 at once and one a second, the
# start would mostly wait), and its idle timeout: all the devices share one
# core and one thread here, and a device busy with another's MLS work for
# long does not ping in time. Everything else is the default configuration.
# The times are of all members' work done one after another on that core.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/ready.sh"
skylark=$1 load=$2 out=$3 members=${4:-1024} first_posts=${5:-16}
# POSTERS=consecutive: the posters are the first members (neighbours in the
# tree) instead of members spread over the group.
extra=()
[ "${POSTERS:-spread}" = consecutive ] && extra+=(--consecutive)
command -v taskset >/dev/null || { echo "e2ee-group.sh: taskset is required" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/data" "$out/profiles"
mkdir -p "$out/profiles"
"$load" provision --data-dir "$out/data" --accounts "$members" --manifest "$out/manifest.json" >/dev/null
cat >"$out/server.toml" <<'EOF'
[limits]
idle_timeout_ms = 3600000
[rate_limits]
key_claims_per_device = { burst = 5000, per_ms = 1 }
EOF

taskset -c 1 "$skylark" serve --data-dir "$out/data" --config "$out/server.toml" --log warn >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:7480/readyz $pid "$out/server.log" || exit 1
/usr/bin/time -v taskset -c 0 "$load" e2ee-group --manifest "$out/manifest.json" --members "$members" \
  --first-posts "$first_posts" "${extra[@]}" --sources 8 --profiles "$out/profiles" --report "$out/report.json" 2>"$out/load.err"
grep -E "Elapsed|Maximum resident|User time|System time" "$out/load.err" || true
echo "profiles: $(du -sh "$out/profiles" | cut -f1) on disk"
