#!/usr/bin/env bash
# Builds the Debian package from the last debug build (cargo deb --no-build
# --profile dev; CI calls this after the tests) and checks it: the files it
# installs, its configuration file marked as one (kept across upgrades), and
# the packaged binary starting on the packaged configuration.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
cargo deb -p skylark --no-build --profile dev --output "$work/skylark.deb" 2>"$work/deb.log" \
  || { cat "$work/deb.log" >&2; echo "check.sh: cargo deb failed" >&2; exit 1; }
# Read the whole answer before matching: with pipefail, `dpkg-deb | grep -q`
# fails whenever grep exits early and dpkg-deb dies of SIGPIPE.
info=$(dpkg-deb --info "$work/skylark.deb") || { echo "check.sh: dpkg-deb cannot read the package" >&2; exit 1; }
grep -q "Package: skylark" <<<"$info" || { echo "check.sh: not a skylark package:" >&2; echo "$info" >&2; exit 1; }
dpkg-deb -x "$work/skylark.deb" "$work/root"
dpkg-deb -e "$work/skylark.deb" "$work/control"
for f in usr/bin/skylark lib/systemd/system/skylark.service etc/skylark/skylark.toml \
  usr/share/doc/skylark/README.md usr/share/doc/skylark/CONFIG.md usr/share/doc/skylark/PROTOCOL.md; do
  [ -e "$work/root/$f" ] || { echo "check.sh: the package lacks /$f" >&2; exit 1; }
done
grep -qx /etc/skylark/skylark.toml "$work/control/conffiles" \
  || { echo "check.sh: /etc/skylark/skylark.toml is not a conffile (dpkg would overwrite the operator's edits)" >&2; exit 1; }
cmp -s "$work/root/lib/systemd/system/skylark.service" ops/systemd/skylark.service \
  || { echo "check.sh: the packaged unit is not ops/systemd/skylark.service" >&2; exit 1; }
# The packaged binary on the packaged configuration (ports from flags: the
# file's are the defaults, perhaps taken on this machine).
"$work/root/usr/bin/skylark" serve --config "$work/root/etc/skylark/skylark.toml" --data-dir "$work/data" \
  --http 127.0.0.1:0 --tcp 127.0.0.1:0 --admin 127.0.0.1:0 --log warn >"$work/out" 2>&1 &
pid=$!
for _ in $(seq 100); do
  grep -q "Skylark is running" "$work/out" && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
grep -q "Skylark is running" "$work/out" || { echo "check.sh: the packaged server did not start:" >&2; cat "$work/out" >&2; exit 1; }
echo "check.sh: the package installs /usr/bin/skylark, the unit, /etc/skylark/skylark.toml (a conffile) and the docs; its server starts"
