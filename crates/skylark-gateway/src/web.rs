//! The web client: static files built into the binary, served at `/`.
//!
//! Plain ES modules with no build step (see `web/`). The browser talks
//! protocol v1 over the WebSocket JSON mapping like any other client.

use crate::Shared;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../web/index.html");
const APP: &str = include_str!("../web/app.js");
const PROTO: &str = include_str!("../web/proto.js");
const STORE: &str = include_str!("../web/store.js");
const WORKER: &str = include_str!("../web/sw.js");
const STYLE: &str = include_str!("../web/style.css");
const ICON: &str = include_str!("../web/icon.svg");
const E2EE: &str = include_str!("../web/e2ee.js");
/// The MLS engine (skylark-e2ee) as WebAssembly, and wasm-bindgen's glue:
/// built by `web/e2ee/build.sh`, committed, checked current by CI.
const E2EE_GLUE: &str = include_str!("../web/e2ee/skylark_e2ee_web.js");
const E2EE_WASM: &[u8] = include_bytes!("../web/e2ee/skylark_e2ee_web_bg.wasm");

/// Scripts and styles only from this origin; the WebSocket back to it; QR
/// codes and attachments' previews arrive as data: images, decrypted
/// attachments as blob: images and audio. No inline script anywhere; the
/// one WebAssembly module (end-to-end encryption) compiles from this origin
/// ('wasm-unsafe-eval' allows compiling WebAssembly, not `eval`).
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; media-src 'self' blob:; \
                   style-src 'self'; script-src 'self' 'wasm-unsafe-eval'; object-src 'none'; base-uri 'none'; \
                   frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    asset_bytes(body.as_bytes(), content_type)
}

fn asset_bytes(body: &'static [u8], content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// The page. In a cluster its policy also lets it reach the other nodes
/// (`connect-src`): its files go through the node its connection is on,
/// which need not be this one (`media`'s CORS lets them answer).
async fn index(State(shared): State<Shared>) -> Response {
    let mut response = asset(INDEX, "text/html; charset=utf-8");
    let nodes = crate::media::node_addresses(&shared);
    if !nodes.is_empty() {
        let connect = "connect-src 'self' ws: wss:";
        let csp = CSP.replacen(connect, &format!("{connect} {}", nodes.join(" ")), 1);
        if let Ok(value) = HeaderValue::from_str(&csp) {
            response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, value);
        }
    }
    response
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(|| async { asset(APP, "text/javascript; charset=utf-8") }))
        .route("/proto.js", get(|| async { asset(PROTO, "text/javascript; charset=utf-8") }))
        .route("/store.js", get(|| async { asset(STORE, "text/javascript; charset=utf-8") }))
        // The service worker, at the root so that it controls the whole page.
        .route("/sw.js", get(|| async { asset(WORKER, "text/javascript; charset=utf-8") }))
        .route("/e2ee.js", get(|| async { asset(E2EE, "text/javascript; charset=utf-8") }))
        .route("/e2ee/skylark_e2ee_web.js", get(|| async { asset(E2EE_GLUE, "text/javascript; charset=utf-8") }))
        .route("/e2ee/skylark_e2ee_web_bg.wasm", get(|| async { asset_bytes(E2EE_WASM, "application/wasm") }))
        .route("/style.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        // Browsers ask for /favicon.ico whatever the page says.
        .route("/favicon.svg", get(|| async { asset(ICON, "image/svg+xml") }))
        .route("/favicon.ico", get(|| async { asset(ICON, "image/svg+xml") }))
}

/// A QR code of `text` as an SVG image.
pub(crate) fn qr_svg(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build())
}
