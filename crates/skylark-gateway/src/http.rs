//! The HTTP side: the registration JSON API, health, metrics, and the
//! WebSocket upgrade.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | POST | /v1/verification | start a session, send a code |
//! | GET | /v1/verification/{id} | session state |
//! | POST | /v1/verification/{id}/resend | send a new code |
//! | POST | /v1/verification/{id}/verify | check the code, enrol the device |
//! | POST | /v1/links | a new device asks for a link code |
//! | GET | /v1/links/{id}?wait_ms= | the new device waits for approval (long poll) |
//! | GET | /v1/push/vapid | the server's VAPID public key for Web Push subscriptions |
//! | GET | /v1/nodes | a cluster's serving nodes and their advertised addresses |
//! | GET | /v1/ws | WebSocket (protocol v1) |
//! | OPTIONS, POST, HEAD, PATCH, GET | /v1/uploads, /v1/uploads/{id}, /v1/blobs/{id} | attachments (tus uploads, downloads; see `media`) |
//! | GET | /, /app.js, /proto.js, /store.js, /e2ee.js, /e2ee/…, /sw.js, /style.css, /favicon.svg (and .ico) | the web client |
//! | GET | /v1/openapi.json | this API as an OpenAPI 3 document (`openapi`) |
//! | GET | /healthz, /readyz | operations (metrics are on the admin listener, see `admin`) |
//!
//! Errors are JSON `{"error": "<code>", "message": "…"}` with a fitting
//! status; rate limits add `Retry-After` (seconds) and `retry_after_ms`.

use crate::Shared;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use skylark_core::verification::{CheckError, Delivery, ResendError};
use skylark_protocol::http;
use skylark_server::devices::{DeviceError, LinkState, display_code};
use skylark_server::registration::{RegistrationError, SessionView};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) async fn serve(mut listener: crate::tls::HttpListener, shared: Shared) {
    use axum::serve::Listener;
    let limits = shared.config.limits;
    let request_timeout = Duration::from_millis(limits.http_request_timeout_ms);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(|| async { axum::Json(crate::openapi::document()) }))
        .route("/readyz", get(readyz))
        .route("/v1/verification", post(start))
        .route("/v1/verification/{id}", get(status))
        .route("/v1/verification/{id}/resend", post(resend))
        .route("/v1/verification/{id}/verify", post(verify))
        .route("/v1/push/vapid", get(vapid_key))
        .route("/v1/nodes", get(nodes))
        .route("/v1/links", post(create_link))
        .route("/v1/links/{id}", get(wait_link))
        .route("/v1/ws", get(crate::ws::upgrade))
        .merge(crate::web::routes())
        .layer(DefaultBodyLimit::max(limits.http_body_bytes))
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            async move {
                // A body trickled in slowly (or a handler stuck) ends here.
                match tokio::time::timeout(request_timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", "request took too long")
                        .into_response(),
                }
            }
        }))
        // Attachments: no body limit (an upload's size is checked against
        // its Upload-Length) and no request timeout (a large file takes
        // longer); `media` cuts off a body that stalls.
        .merge(crate::media::routes(shared.clone()))
        .with_state(shared.clone());
    let header_timeout = Duration::from_millis(limits.http_header_timeout_ms);
    loop {
        let (io, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            next = listener.accept() => next,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            use tower::ServiceExt;
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request.map(axum::body::Body::new))
        });
        let shutdown = shared.shutdown.clone();
        shared.tracker.spawn(async move {
            // Headers must arrive within the timeout (slowloris), also for
            // each next request on a kept-alive connection.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "ok", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// The server accepts connections (503 while starting or stopping).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "ready", body = String, content_type = "text/plain"),
        (status = 503, description = "not ready", body = String, content_type = "text/plain"),
    ))]
async fn readyz(State(shared): State<Shared>) -> Response {
    if shared.ready.load(Ordering::SeqCst) && !shared.shutdown.is_cancelled() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// A JSON API error.
pub(crate) struct ApiError {
    status: StatusCode,
    body: http::ApiError,
    retry_after: Option<Duration>,
}

impl ApiError {
    pub(crate) fn message(&self) -> &str {
        &self.body.message
    }

    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        let body = http::ApiError {
            error: code.to_owned(),
            message: message.into(),
            retry_after_ms: None,
            attempts_left: None,
        };
        Self { status, body, retry_after: None }
    }

    pub(crate) fn retry_after(mut self, wait: Duration) -> Self {
        self.body.retry_after_ms = Some(wait.as_millis() as u64);
        self.retry_after = Some(wait);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up so a client that obeys is never early.
            let secs = wait.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

impl From<RegistrationError> for ApiError {
    fn from(e: RegistrationError) -> Self {
        use RegistrationError as R;
        let message = e.to_string();
        match e {
            R::InvalidPhone(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_phone", message),
            R::RateLimited(l) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(l.retry_after)
            }
            R::UnknownSession => ApiError::new(StatusCode::NOT_FOUND, "unknown_session", message),
            R::Banned => ApiError::new(StatusCode::FORBIDDEN, "banned", message),
            R::Resend(ResendError::TooSoon { retry_after_ms }) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "resend_too_soon", message)
                    .retry_after(Duration::from_millis(retry_after_ms))
            }
            R::Resend(ResendError::TooManySends) => ApiError::new(StatusCode::GONE, "sends_exhausted", message),
            R::Check(CheckError::Expired) => ApiError::new(StatusCode::GONE, "code_expired", message),
            R::Check(CheckError::AttemptsExhausted) => ApiError::new(StatusCode::GONE, "attempts_exhausted", message),
            R::Check(CheckError::WrongCode { attempts_left }) => {
                let mut err = ApiError::new(StatusCode::BAD_REQUEST, "wrong_code", message);
                err.body.attempts_left = Some(attempts_left);
                err
            }
            R::InvalidKey(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_public_key", message),
            R::InvalidName(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_name", message),
            R::PinRequired { .. } => ApiError::new(StatusCode::LOCKED, "registration_locked", message),
            R::WrongPin { attempts_left, retry_after_ms } => {
                let mut err = ApiError::new(StatusCode::FORBIDDEN, "wrong_pin", message);
                err.body.attempts_left = Some(attempts_left);
                if retry_after_ms > 0 {
                    err = err.retry_after(Duration::from_millis(retry_after_ms));
                }
                err
            }
            R::PinWait(ms) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "pin_wait", message).retry_after(Duration::from_millis(ms))
            }
            R::PinLockedOut { .. } => ApiError::new(StatusCode::LOCKED, "pin_locked", message),
            R::InvalidPin => ApiError::new(StatusCode::BAD_REQUEST, "invalid_pin", message),
            R::Store(e) => {
                tracing::error!(error = %e, "store failed in the registration api");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}

/// Decodes a device public key sent as base64 (its length and curve point
/// are checked by the service).
fn public_key(text: &str) -> Result<Vec<u8>, ApiError> {
    BASE64
        .decode(text.as_bytes())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_public_key", "public_key is not base64"))
}

/// A request body, refused in the API's own error shape (not axum's plain
/// text) when it is over `limits.http_body_bytes` or cannot be read.
struct Body(Bytes);

impl axum::extract::FromRequest<Shared> for Body {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, shared: &Shared) -> Result<Self, ApiError> {
        match Bytes::from_request(request, shared).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                let max = shared.config.limits.http_body_bytes;
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the request body is larger than the server accepts ({max} bytes)"),
                ))
            }
            Err(e) => Err(ApiError::new(e.status(), "malformed_request", e.body_text())),
        }
    }
}

/// Parses a JSON body, answering malformed input in the API's own error shape.
fn parse<T: DeserializeOwned>(Body(body): &Body) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_request", e.to_string()))
}

fn session_json(view: SessionView, now_ms: u64) -> axum::Json<http::VerificationView> {
    let sms = match view.delivery {
        Delivery::Pending => http::SmsStatus { status: "pending".into(), error: None },
        Delivery::Sent => http::SmsStatus { status: "sent".into(), error: None },
        Delivery::Failed(error) => http::SmsStatus { status: "failed".into(), error: Some(error) },
    };
    axum::Json(http::VerificationView {
        session_id: view.session_id,
        phone: view.phone.to_string(),
        code_expires_in_ms: view.code_expires_at_ms.saturating_sub(now_ms),
        next_resend_in_ms: view.next_resend_at_ms.map(|t| t.saturating_sub(now_ms)),
        sms,
    })
}

/// Starts a verification: a code is sent to the number by SMS.
#[utoipa::path(post, path = "/v1/verification", tag = "sign-up", request_body = http::StartVerification,
    responses(
        (status = 200, description = "A session; the code is on its way", body = http::VerificationView),
        (status = 400, description = "`invalid_phone`, or `malformed_request`", body = http::ApiError),
        (status = 403, description = "`banned`: the number is banned from this server", body = http::ApiError),
        (status = 429, description = "`rate_limited` (per address, number prefix or number); see Retry-After", body = http::ApiError),
    ))]
async fn start(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Body,
) -> Result<axum::Json<http::VerificationView>, ApiError> {
    let request: http::StartVerification = parse(&body)?;
    let view = shared.server.registration.start(&request.phone, peer.ip()).await?;
    Ok(session_json(view, shared.server.clock.now_ms()))
}

/// A verification session's state.
#[utoipa::path(get, path = "/v1/verification/{id}", tag = "sign-up",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "The session", body = http::VerificationView),
        (status = 404, description = "`unknown_session`", body = http::ApiError),
    ))]
async fn status(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<http::VerificationView>, ApiError> {
    let view = shared.server.registration.status(&id).await?;
    Ok(session_json(view, shared.server.clock.now_ms()))
}

/// Sends a new code for the session.
#[utoipa::path(post, path = "/v1/verification/{id}/resend", tag = "sign-up",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "A new code is on its way", body = http::VerificationView),
        (status = 403, description = "`banned`", body = http::ApiError),
        (status = 404, description = "`unknown_session`", body = http::ApiError),
        (status = 410, description = "`sends_exhausted`: start a new session", body = http::ApiError),
        (status = 429, description = "`resend_too_soon` or `rate_limited`; see Retry-After", body = http::ApiError),
    ))]
async fn resend(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<axum::Json<http::VerificationView>, ApiError> {
    let view = shared.server.registration.resend(&id, peer.ip()).await?;
    Ok(session_json(view, shared.server.clock.now_ms()))
}

/// Checks the code; if right, registers the number and enrols the device.
#[utoipa::path(post, path = "/v1/verification/{id}/verify", tag = "sign-up", request_body = http::VerifyRequest,
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "The device is enrolled", body = http::Registered),
        (status = 400, description = "`wrong_code` (with `attempts_left`), `invalid_public_key`, `invalid_device_name` or `malformed_request`", body = http::ApiError),
        (status = 403, description = "`banned`, or `wrong_pin` (with `attempts_left`, and Retry-After once guesses must wait)", body = http::ApiError),
        (status = 404, description = "`unknown_session`", body = http::ApiError),
        (status = 410, description = "`code_expired` or `attempts_exhausted`: resend", body = http::ApiError),
        (status = 423, description = "`registration_locked`: the number has a two-step verification PIN, send it as `pin`; `pin_locked`: too many wrong PINs", body = http::ApiError),
        (status = 429, description = "`rate_limited` or `pin_wait`; see Retry-After", body = http::ApiError),
    ))]
async fn verify(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    body: Body,
) -> Result<axum::Json<http::Registered>, ApiError> {
    let request: http::VerifyRequest = parse(&body)?;
    let key = public_key(&request.public_key)?;
    let registered = shared
        .server
        .registration
        .verify(&id, &request.code, &key, &request.device_name, peer.ip(), request.pin.as_deref())
        .await?;
    Ok(axum::Json(http::Registered {
        account_id: registered.account.id.0,
        device_id: registered.device.id.0,
        phone: registered.account.phone.to_string(),
        device_name: registered.device.name,
    }))
}

fn device_api_error(e: DeviceError) -> ApiError {
    let message = e.to_string();
    match e {
        DeviceError::RateLimited(l) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(l.retry_after)
        }
        DeviceError::InvalidKey => ApiError::new(StatusCode::BAD_REQUEST, "invalid_public_key", message),
        DeviceError::InvalidName(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_device_name", message),
        DeviceError::UnknownLink | DeviceError::UnknownCode => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_link", message)
        }
        DeviceError::Expired => ApiError::new(StatusCode::GONE, "link_expired", message),
        DeviceError::LimitReached(_) => ApiError::new(StatusCode::CONFLICT, "device_limit", message),
        DeviceError::UnknownDevice => ApiError::new(StatusCode::NOT_FOUND, "unknown_device", message),
        DeviceError::Store(e) => {
            tracing::error!(error = %e, "store failed in the link api");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
        }
    }
}

/// A new device asks to be linked to an account: it gets a code to approve
/// on a signed-in device.
#[utoipa::path(post, path = "/v1/links", tag = "linking", request_body = http::LinkRequest,
    responses(
        (status = 200, description = "A pending link and its code", body = http::Link),
        (status = 400, description = "`invalid_public_key`, `invalid_device_name` or `malformed_request`", body = http::ApiError),
        (status = 429, description = "`rate_limited`; see Retry-After", body = http::ApiError),
    ))]
async fn create_link(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Body,
) -> Result<axum::Json<http::Link>, ApiError> {
    let request: http::LinkRequest = parse(&body)?;
    let key = public_key(&request.public_key)?;
    let link = shared.server.devices.create_link(&key, &request.device_name, peer.ip()).map_err(device_api_error)?;
    let code = display_code(&link.code);
    Ok(axum::Json(http::Link {
        link_id: link.link_id,
        qr_svg: crate::web::qr_svg(&code),
        code,
        expires_in_ms: link.expires_at_ms.saturating_sub(shared.server.clock.now_ms()),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct WaitQuery {
    /// How long to wait for a change, in milliseconds (at most 30,000).
    #[serde(default)]
    #[param(maximum = 30000)]
    wait_ms: u64,
}

/// Longest a link long-poll is held open.
const MAX_LINK_WAIT: Duration = Duration::from_secs(30);

/// The new device waits for its link's approval (a long poll).
#[utoipa::path(get, path = "/v1/links/{id}", tag = "linking",
    params(("id" = String, Path, description = "The link id"), WaitQuery),
    responses(
        (status = 200, description = "Pending, expired, or approved with the new device's identity", body = http::LinkStatus),
        (status = 404, description = "`unknown_link`", body = http::ApiError),
    ))]
async fn wait_link(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<WaitQuery>,
) -> Result<axum::Json<http::LinkStatus>, ApiError> {
    let wait = Duration::from_millis(query.wait_ms).min(MAX_LINK_WAIT);
    let state = tokio::select! {
        state = shared.server.devices.wait_link(&id, wait) => state.map_err(device_api_error)?,
        _ = shared.shutdown.cancelled() => LinkState::Pending,
    };
    Ok(axum::Json(match state {
        LinkState::Pending => http::LinkStatus::Pending,
        LinkState::Expired => http::LinkStatus::Expired,
        LinkState::Approved { account, device, phone } => {
            http::LinkStatus::Approved { account_id: account.0, device_id: device.0, phone: phone.to_string() }
        }
    }))
}

/// The nodes a client may fail over to (the web client keeps the list and
/// tries them when the node it came from is gone). Every node of a cluster
/// answers with the same list once their views agree; a single server has
/// no others.
#[utoipa::path(get, path = "/v1/nodes", tag = "cluster",
    responses((status = 200, description = "The nodes taking devices now (none on a single server)", body = http::NodeList)))]
async fn nodes(State(shared): State<Shared>) -> Response {
    let nodes = shared.server.router.cluster().map_or_else(Vec::new, |cluster| {
        cluster.serving().into_iter().map(|(node, address)| http::NodeAddress { node, address }).collect()
    });
    let mut response = axum::Json(http::NodeList { nodes }).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The server's VAPID public key, for Web Push subscriptions.
#[utoipa::path(get, path = "/v1/push/vapid", tag = "push",
    responses((status = 200, description = "The key", body = http::VapidKey)))]
async fn vapid_key(State(shared): State<Shared>) -> axum::Json<http::VapidKey> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    axum::Json(http::VapidKey { public_key: URL_SAFE_NO_PAD.encode(shared.server.pusher.vapid_public_key()) })
}
