//! The web client end to end: `tests/web/e2e.mjs` drives headless Chromium
//! (Debian's `chromium`, through `playwright-core` from npm) against the
//! real `skylark serve` binary. Screenshots of the main screens are kept in
//! `target/tmp/web-screenshots` (test artifacts, not committed).

use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "the web client test needs Chromium: install Debian's `chromium` package (apt-get install chromium) \
         or point CHROMIUM at a Chromium binary (.ci/run installs it)"
    );
}

/// `playwright-core` and `axe-core`, installed from the committed package-lock.json.
pub(crate) fn playwright(dir: &Path) {
    if dir.join("node_modules/playwright-core").exists() && dir.join("node_modules/axe-core").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .unwrap_or_else(|e| panic!("the web client test needs npm (Node.js) to install playwright-core: {e}"));
    assert!(status.success(), "`npm ci` in {} failed", dir.display());
}

/// `tests/web/e2ee.mjs`: the page's end-to-end encryption (the MLS engine as
/// WebAssembly) with the command line client and another browser.
#[test]
fn the_web_client_chats_end_to_end_encrypted_with_the_cli_and_other_browsers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    let chromium = chromium();
    playwright(&dir);
    let out = Command::new("node")
        .arg("e2ee.mjs")
        .current_dir(&dir)
        .env("SKYLARK_BIN", env!("CARGO_BIN_EXE_skylark"))
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap_or_else(|e| panic!("the web client test needs Node.js (`node` on PATH): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "web e2ee failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("web e2ee: ok"), "the script ended without its last check:\n{stdout}");
}

/// `tests/web/crypto.mjs`: the page's key-package claims in batches, and one
/// number at a time when a server refuses a batch; a commit refused for good
/// dropped and said, one refused while the server is busy kept for the next
/// connect (Node only, no browser).
#[test]
fn the_web_clients_key_claims_and_commit_refusals_against_a_stand_in_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    let out = Command::new("node")
        .arg("crypto.mjs")
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("the web client test needs Node.js (`node` on PATH): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "web crypto failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("web crypto: ok"), "the script ended without its last check:\n{stdout}");
}

#[test]
fn the_web_client_signs_up_chats_links_groups_reloads_and_survives_a_restart() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    let chromium = chromium();
    playwright(&dir);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    let out = Command::new("node")
        .arg("e2e.mjs")
        .current_dir(&dir)
        .env("SKYLARK_BIN", env!("CARGO_BIN_EXE_skylark"))
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOTS", &shots)
        .output()
        .unwrap_or_else(|e| panic!("the web client test needs Node.js (`node` on PATH): {e}"));
    assert!(
        out.status.success(),
        "web e2e failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for shot in [
        "01-welcome",
        "04-conversation",
        "07-group-info",
        "08-history",
        "11-narrow-chat",
        "12-blocked",
        "13-settings",
        "14-pin-asked",
        "16-reply-react-edit",
        "17-deleted",
        "18-disappearing",
        "19-attachments",
    ] {
        assert!(shots.join(format!("{shot}.png")).exists(), "screenshot {shot} missing");
    }
}
