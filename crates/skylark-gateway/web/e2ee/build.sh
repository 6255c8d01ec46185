#!/usr/bin/env bash
# Builds the web client's end-to-end encryption module: the skylark-e2ee-web
# crate (skylark-e2ee, the MLS code the CLI runs) for wasm32-unknown-unknown,
# then wasm-bindgen's JavaScript glue. The output, in this directory, is
# committed and served from the binary like the rest of the page.
#
#   crates/skylark-gateway/web/e2ee/build.sh           rebuild it here
#   crates/skylark-gateway/web/e2ee/build.sh --check   rebuild elsewhere and fail
#                                                     unless the committed one matches
#
# Needs the wasm32-unknown-unknown target (rustup target add
# wasm32-unknown-unknown) and wasm-bindgen-cli at the version of the
# wasm-bindgen crate in Cargo.lock (cargo install wasm-bindgen-cli --version V).
# The bytes depend on the Rust toolchain too: VERSIONS records the one used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
cd "$root"
wanted=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
if ! command -v wasm-bindgen >/dev/null 2>&1; then
  echo "build.sh: wasm-bindgen is missing: cargo install wasm-bindgen-cli --version $wanted" >&2
  exit 1
fi
have=$(wasm-bindgen --version | awk '{print $2}')
if [ "$have" != "$wanted" ]; then
  echo "build.sh: wasm-bindgen is $have but Cargo.lock has $wanted: cargo install wasm-bindgen-cli --version $wanted" >&2
  exit 1
fi
if ! grep -qx wasm32-unknown-unknown <<<"$(rustup target list --installed 2>/dev/null)"; then
  echo "build.sh: the Rust target wasm32-unknown-unknown is missing: rustup target add wasm32-unknown-unknown" >&2
  exit 1
fi
versions="$(rustc --version)
wasm-bindgen $have"
out="$here"
if [ "${1:-}" = "--check" ]; then
  recorded=$(cat "$here/VERSIONS" 2>/dev/null || true)
  if [ "$recorded" != "$versions" ]; then
    echo "build.sh: the committed module was built with" >&2
    echo "$recorded" >&2
    echo "and this machine has" >&2
    echo "$versions" >&2
    echo "so its bytes cannot be compared; rebuild it with crates/skylark-gateway/web/e2ee/build.sh and commit it" >&2
    exit 1
  fi
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
target_dir="${CARGO_TARGET_DIR:-$root/target}"
# Paths of the sources would otherwise end up in panic messages: the same
# bytes whichever directory or machine builds it.
export CARGO_ENCODED_RUSTFLAGS=$(printf '%s\x1f' --cfg 'getrandom_backend="wasm_js"' \
  "--remap-path-prefix=$root=/skylark" "--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo")
CARGO_ENCODED_RUSTFLAGS=${CARGO_ENCODED_RUSTFLAGS%$'\x1f'}
cargo build --locked --quiet -p skylark-e2ee-web --target wasm32-unknown-unknown --profile wasm
wasm-bindgen --target web --no-typescript --remove-name-section --remove-producers-section \
  --out-dir "$out" "$target_dir/wasm32-unknown-unknown/wasm/skylark_e2ee_web.wasm"
if [ "${1:-}" = "--check" ]; then
  for f in skylark_e2ee_web.js skylark_e2ee_web_bg.wasm; do
    cmp -s "$out/$f" "$here/$f" || {
      echo "build.sh: the committed web/e2ee/$f is not what the sources build;" >&2
      echo "rebuild it with crates/skylark-gateway/web/e2ee/build.sh and commit it" >&2
      exit 1
    }
  done
  echo "build.sh: the committed WebAssembly module is current"
else
  echo "$versions" >"$here/VERSIONS"
  ls -l "$here"/skylark_e2ee_web*
fi
