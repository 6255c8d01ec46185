#!/usr/bin/env bash
# A screenshot of the Grafana dashboard from a real run, without Grafana:
# the server runs with provisioned accounts, Prometheus (Debian's package)
# scrapes its admin listener's /metrics every second, skylark-load drives
# idle connections and 1:1 traffic, and render.mjs runs every panel's
# queries against that Prometheus and draws them (headless Chromium).
#
#   ops/grafana/render.sh SKYLARK SKYLARK_LOAD OUT.png
#
# For example (from the repository's root):
#   cargo build --release -p skylark -p skylark-load
#   (cd crates/skylark/tests/web && npm ci)
#   ops/grafana/render.sh target/release/skylark target/release/skylark-load ops/grafana/dashboard.png
set -euo pipefail
server=$(realpath "$1") load=$(realpath "$2") out=$(realpath -m "$3")
root=$(cd "$(dirname "$0")/../.." && pwd)
for tool in prometheus curl node; do
  command -v $tool >/dev/null || { echo "render.sh: $tool is required (Debian: prometheus, curl, nodejs)" >&2; exit 1; }
done
playwright=$root/crates/skylark/tests/web/node_modules/playwright-core/index.mjs
[ -f "$playwright" ] || { echo "render.sh: run npm ci in crates/skylark/tests/web first (playwright-core)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
http=127.0.0.1:17580 tcp=127.0.0.1:17581 admin=127.0.0.1:17582 prom=127.0.0.1:17590

"$load" provision --data-dir "$work/data" --accounts 1200 --manifest "$work/manifest.json" >/dev/null
"$server" serve --data-dir "$work/data" --http $http --tcp $tcp --admin $admin --log warn >"$work/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://$http/readyz" >/dev/null && break; sleep 0.1; done
cat >"$work/prometheus.yml" <<YAML
global: { scrape_interval: 1s }
scrape_configs:
  - job_name: skylark
    authorization: { credentials_file: $work/data/admin.token }
    static_configs: [ { targets: ["$admin"] } ]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address=$prom --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://$prom/-/ready" >/dev/null && break; sleep 0.1; done
start=$(date +%s)
sleep 5
# 1,000 idle devices come and stay; meanwhile 100 pairs chat at two rates.
"$load" idle --manifest "$work/manifest.json" --tcp $tcp --connections 1000 --offset 200 --rate 200 --sources 8 \
  --hold-secs 45 >"$work/idle.txt" 2>&1 &
pids+=($!)
"$load" chat --manifest "$work/manifest.json" --tcp $tcp --pairs 100 --rate 300 --seconds 20 --sources 2 >"$work/chat1.txt"
"$load" chat --manifest "$work/manifest.json" --tcp $tcp --pairs 100 --rate 1000 --seconds 20 --sources 2 >"$work/chat2.txt"
sleep 10
end=$(date +%s)
PLAYWRIGHT_CORE=$playwright node "$root/ops/grafana/render.mjs" "http://$prom" "$start" "$end" "$out"
grep -h "^chat:" "$work"/chat*.txt
