//! The operator's listener (default `127.0.0.1:7482`, apart from the
//! public one): Prometheus metrics, and the admin API under `/admin/v1`.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | /metrics | Prometheus metrics (no token: keep the listener private) |
//! | GET | /admin/v1/stats | version, uptime, live connections |
//! | GET | /admin/v1/accounts/{phone} | an account, its devices, which are connected |
//! | POST | /admin/v1/devices/{id}/disconnect | end a device's live connection (it may reconnect) |
//! | POST | /admin/v1/backup `{"dest": PATH}` | a consistent copy of the embedded store, written by the server |
//! | GET | /admin/v1/bans | the banned numbers |
//! | POST | /admin/v1/bans `{"phone": NUMBER}` | ban a number: refused at sign-up and at connection; its devices are disconnected |
//! | DELETE | /admin/v1/bans/{phone} | lift a ban |
//! | POST | /admin/v1/test/sms `{"phone": NUMBER}` | send a test SMS through the configured provider |
//! | POST | /admin/v1/test/push/{device} | send a device one wake-up through its push registration |
//!
//! Every `/admin/v1` request needs `Authorization: Bearer <token>` (the
//! token `skylark serve` keeps in `admin.token` in its data directory), and
//! every one is written to the audit log, whatever its outcome. Nothing
//! here returns message content.

use crate::Shared;
use crate::http::ApiError;
use axum::Router;
use axum::extract::{ConnectInfo, Path};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use skylark_core::{DeviceId, PhoneNumber};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The admin API's access and audit settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// The bearer token every `/admin/v1` request must carry; none: the
    /// admin API refuses every request (metrics are still served).
    pub token: Option<String>,
    /// Where every admin action is appended, one JSON object per line.
    pub audit_log: Option<std::path::PathBuf>,
}

/// Who is asking, as every admin handler needs it: the admin API, the
/// client's address (for the audit log) and the headers (for the token).
struct Caller {
    admin: Admin,
    from: SocketAddr,
    headers: HeaderMap,
}

impl axum::extract::FromRequestParts<Admin> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        admin: &Admin,
    ) -> Result<Self, Self::Rejection> {
        let from =
            parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
        Ok(Caller { admin: admin.clone(), from, headers: parts.headers.clone() })
    }
}

impl Caller {
    /// Authorizes, audits the attempt, runs `act`, audits its outcome.
    async fn run<T: Serialize, F: Future<Output = Result<T, ApiError>>>(
        &self,
        action: &str,
        target: &str,
        act: F,
    ) -> Response {
        if let Err(refused) = self.admin.authorize(&self.headers) {
            let _ = self.admin.audit(self.from, action, target, "refused: no valid token");
            return refused.into_response();
        }
        if let Err(e) = self.admin.audit(self.from, action, target, "started") {
            return e.into_response();
        }
        let result = act.await;
        let outcome = match &result {
            Ok(_) => "done".to_owned(),
            Err(e) => format!("failed: {}", e.message()),
        };
        let _ = self.admin.audit(self.from, action, target, &outcome);
        match result {
            Ok(body) => axum::Json(body).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

#[derive(Clone)]
struct Admin {
    shared: Shared,
    started: Instant,
    audit: Arc<std::sync::Mutex<()>>,
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Shared) {
    let admin = Admin { shared: shared.clone(), started: Instant::now(), audit: Arc::default() };
    let app = Router::new()
        .route("/metrics", get(|| async { crate::metrics_endpoint::render() }))
        .route("/admin/v1/stats", get(stats))
        .route("/admin/v1/accounts/{phone}", get(account).delete(delete_account))
        .route("/admin/v1/devices/{id}/disconnect", post(disconnect))
        .route("/admin/v1/backup", post(backup))
        .route("/admin/v1/reports", get(reports))
        .route("/admin/v1/messages/{id}", get(trace))
        .route("/admin/v1/bans", get(bans).post(ban))
        .route("/admin/v1/bans/{phone}", axum::routing::delete(unban))
        .route("/admin/v1/test/sms", post(test_sms))
        .route("/admin/v1/test/push/{device}", post(test_push))
        .with_state(admin);
    let shutdown = shared.shutdown.clone();
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "the admin listener stopped");
    }
}

impl Admin {
    /// Checks the bearer token, in time independent of where it differs.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = self.shared.config.admin.token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "this server has no admin token configured, so its admin API is off",
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid admin token is needed (Authorization: Bearer, from admin.token in the data directory)",
            ))
        }
    }

    /// Appends one line to the audit log; an action that cannot be audited
    /// is not done.
    fn audit(&self, from: SocketAddr, action: &str, target: &str, outcome: &str) -> Result<(), ApiError> {
        tracing::info!(%from, action, target, outcome, "admin action");
        let Some(path) = self.shared.config.admin.audit_log.as_deref() else { return Ok(()) };
        #[derive(Serialize)]
        struct Line<'a> {
            at_ms: u64,
            from: String,
            action: &'a str,
            target: &'a str,
            outcome: &'a str,
        }
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let line = Line { at_ms, from: from.to_string(), action, target, outcome };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        let _guard = self.audit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A log created now has a name only once its directory is synced.
        let created = !path.exists();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_data()))
            .and_then(|()| if created { skylark_store::sync_parent(path) } else { Ok(()) })
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "audit_failed",
                    format!("the audit log {} cannot be written ({e}), so nothing was done", path.display()),
                )
            })
    }
}

#[derive(Serialize)]
struct Stats {
    version: &'static str,
    uptime_seconds: u64,
    /// On this node.
    live_connections: usize,
    /// On every node of the cluster (absent on a single server).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_connections: Option<usize>,
    /// Cluster nodes that did not answer in time (their connections are not counted).
    #[serde(skip_serializing_if = "is_zero")]
    unanswered_nodes: usize,
    ready: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

async fn stats(caller: Caller) -> Response {
    let act = async {
        let server = &caller.admin.shared.server;
        let (cluster_connections, unanswered_nodes) = match server.router.cluster() {
            Some(_) => {
                let (n, unanswered) = server.live_sessions().await;
                (Some(n), unanswered)
            }
            None => (None, 0),
        };
        Ok(Stats {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: caller.admin.started.elapsed().as_secs(),
            live_connections: server.sessions.live_count(),
            cluster_connections,
            unanswered_nodes,
            ready: caller.admin.shared.ready.load(std::sync::atomic::Ordering::SeqCst),
        })
    };
    caller.run("stats", "", act).await
}

#[derive(Serialize)]
struct AccountView {
    account_id: u64,
    phone: String,
    created_at_ms: u64,
    devices: Vec<DeviceView>,
}

#[derive(Serialize)]
struct DeviceView {
    id: u64,
    name: String,
    created_at_ms: u64,
    last_seen_ms: Option<u64>,
    connected: bool,
}

async fn account(caller: Caller, Path(phone): Path<String>) -> Response {
    let act = async {
        let server = &caller.admin.shared.server;
        let (_, account) = account_of(server, &phone).await?;
        let devices = server.devices.list(account.id).await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_failed", format!("listing the devices failed: {e}"))
        })?;
        Ok(AccountView {
            account_id: account.id.0,
            phone: account.phone.to_string(),
            created_at_ms: account.created_at_ms,
            devices: devices
                .into_iter()
                .map(|d| DeviceView {
                    id: d.device.id.0,
                    name: d.device.name,
                    created_at_ms: d.device.created_at_ms,
                    last_seen_ms: d.device.last_seen_ms,
                    connected: d.online,
                })
                .collect(),
        })
    };
    caller.run("account", &phone, act).await
}

/// The account holding `phone`, or a 404 in words.
async fn account_of(
    server: &skylark_server::Server,
    phone: &str,
) -> Result<(skylark_core::PhoneNumber, skylark_core::Account), ApiError> {
    let number = parse_phone(phone)?;
    let account =
        server.store.account_by_phone(&number).await.map_err(store_failed)?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_account", format!("no account has {number}"))
        })?;
    Ok((number, account))
}

/// Deletes an account (as its owner can, from a device): it leaves its
/// groups, its number is freed, its devices are signed out.
async fn delete_account(caller: Caller, Path(phone): Path<String>) -> Response {
    let act = async {
        let server = &caller.admin.shared.server;
        let (number, account) = account_of(server, &phone).await?;
        server.delete_account(account.id).await.map_err(|e| match e {
            skylark_server::accounts::AccountError::UnknownAccount => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_account", format!("no account has {number}"))
            }
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "delete_failed", format!("deleting failed: {e}")),
        })
    };
    caller.run("delete_account", &phone, act).await
}

#[derive(Serialize)]
struct TraceView {
    #[serde(flatten)]
    trace: skylark_server::trace::Trace,
    sender_phone: String,
    /// The recipient's number, or the group's subject.
    to_name: String,
}

/// A message's lifecycle (`ACCOUNT:SEQ`, as `skylark send` prints it),
/// without its content.
async fn trace(caller: Caller, Path(id): Path<String>) -> Response {
    let act = async {
        let bad = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_message_id",
                "a message id is ACCOUNT:SEQ, as `skylark send` prints it (say 3:17)",
            )
        };
        let (account, seq) = id.split_once(':').ok_or_else(bad)?;
        let account = skylark_core::AccountId(account.trim().parse().map_err(|_| bad())?);
        let seq = seq.trim().parse().map_err(|_| bad())?;
        let server = &caller.admin.shared.server;
        let trace = server
            .trace(skylark_core::message::MessageId { sender: account, seq })
            .await
            .map_err(store_failed)?
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_message", format!("no message {id}")))?;
        let directory = server.router.directory();
        let phone = |a| async move {
            Ok::<String, ApiError>(
                directory.phone(a).await.map_err(store_failed)?.map(|p| p.to_string()).unwrap_or_default(),
            )
        };
        let to_name = if trace.to.is_group() {
            server
                .store
                .group(trace.to)
                .await
                .map_err(store_failed)?
                .map(|g| format!("group \"{}\"", g.subject))
                .unwrap_or_default()
        } else {
            phone(trace.to).await?
        };
        Ok(TraceView { sender_phone: phone(trace.sender).await?, to_name, trace })
    };
    caller.run("trace", &id, act).await
}

#[derive(Serialize)]
struct ReportView {
    id: u64,
    at_ms: u64,
    reporter: String,
    /// The reported account's number, or the group's id and subject.
    reported: String,
    blocked: bool,
    /// The last messages of the conversation: who sent them, when, how
    /// large (the server cannot read them).
    messages: Vec<ReportedView>,
}

#[derive(Serialize)]
struct ReportedView {
    sender: String,
    seq: u64,
    sent_at_ms: u64,
    bytes: u64,
}

/// Users' reports, newest first (at most 100).
async fn reports(caller: Caller) -> Response {
    let act = async {
        let server = &caller.admin.shared.server;
        let directory = server.router.directory();
        let name = |id: skylark_core::AccountId| async move {
            if id.is_group() {
                let subject =
                    server.store.group(id).await.map_err(store_failed)?.map(|g| g.subject).unwrap_or_default();
                return Ok::<String, ApiError>(format!("group {} \"{subject}\"", id.0));
            }
            let phone = directory.phone(id).await.map_err(store_failed)?;
            Ok(phone.map(|p| p.to_string()).unwrap_or_else(|| format!("deleted account {}", id.0)))
        };
        let mut out = Vec::new();
        for r in server.store.reports(100).await.map_err(store_failed)? {
            let mut messages = Vec::with_capacity(r.messages.len());
            for m in &r.messages {
                messages.push(ReportedView {
                    sender: name(m.sender).await?,
                    seq: m.seq,
                    sent_at_ms: m.sent_at_ms,
                    bytes: m.bytes,
                });
            }
            out.push(ReportView {
                id: r.id,
                at_ms: r.at_ms,
                reporter: name(r.reporter).await?,
                reported: name(r.reported).await?,
                blocked: r.blocked,
                messages,
            });
        }
        Ok(out)
    };
    caller.run("reports", "", act).await
}

#[derive(Serialize)]
struct Disconnected {
    device: u64,
    /// Whether it had a live connection (on any node) to end.
    was_connected: bool,
    /// Cluster nodes that did not answer in time (it may be connected there).
    #[serde(skip_serializing_if = "is_zero")]
    unanswered_nodes: usize,
}

async fn disconnect(caller: Caller, Path(id): Path<u64>) -> Response {
    let act = async {
        let (ended, unanswered_nodes) = caller.admin.shared.server.disconnect_devices(&[DeviceId(id)]).await;
        Ok(Disconnected { device: id, was_connected: ended > 0, unanswered_nodes })
    };
    caller.run("disconnect", &id.to_string(), act).await
}

#[derive(Deserialize)]
struct BackupRequest {
    dest: std::path::PathBuf,
}

#[derive(Serialize)]
struct BackupMade {
    dest: String,
    rows: u64,
    bytes: u64,
    seconds: f64,
}

async fn backup(caller: Caller, body: axum::body::Bytes) -> Response {
    let request: Result<BackupRequest, _> = serde_json::from_slice(&body);
    let target = request.as_ref().map(|r| r.dest.display().to_string()).unwrap_or_default();
    let act = async {
        let request = request.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("expected {{\"dest\": PATH}}: {e}"))
        })?;
        if !request.dest.is_absolute() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "give the backup's path as an absolute path on the server's machine",
            ));
        }
        let began = Instant::now();
        let made = caller
            .admin
            .shared
            .server
            .store
            .backup(&request.dest)
            .await
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, "backup_failed", e.to_string()))?;
        Ok(BackupMade {
            dest: request.dest.display().to_string(),
            rows: made.rows,
            bytes: made.bytes,
            seconds: began.elapsed().as_secs_f64(),
        })
    };
    caller.run("backup", &target, act).await
}

fn parse_phone(phone: &str) -> Result<PhoneNumber, ApiError> {
    PhoneNumber::parse(phone).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_phone", format!("{phone} is not a phone number: {e}"))
    })
}

#[derive(Serialize)]
struct BanView {
    phone: String,
    at_ms: u64,
}

async fn bans(caller: Caller) -> Response {
    let act = async {
        let listed = caller.admin.shared.server.bans.list().await.map_err(store_failed)?;
        Ok(listed.into_iter().map(|(p, at_ms)| BanView { phone: p.to_string(), at_ms }).collect::<Vec<_>>())
    };
    caller.run("bans", "", act).await
}

#[derive(Deserialize)]
struct PhoneRequest {
    phone: String,
}

/// A `{"phone": NUMBER}` body: the text given (for the audit log), and the
/// number or why it is not one.
fn phone_body(body: &[u8]) -> (String, Result<PhoneNumber, ApiError>) {
    match serde_json::from_slice::<PhoneRequest>(body) {
        Ok(request) => {
            let phone = parse_phone(&request.phone);
            (request.phone, phone)
        }
        Err(e) => {
            let why = format!("expected {{\"phone\": NUMBER}}: {e}");
            (String::new(), Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", why)))
        }
    }
}

#[derive(Serialize)]
struct Banned {
    phone: String,
    /// Live connections of the account's devices that were ended (on any node).
    disconnected: usize,
    /// Cluster nodes that did not answer in time.
    #[serde(skip_serializing_if = "is_zero")]
    unanswered_nodes: usize,
}

async fn ban(caller: Caller, body: axum::body::Bytes) -> Response {
    let (target, phone) = phone_body(&body);
    let act = async {
        let phone = phone?;
        let server = &caller.admin.shared.server;
        server.bans.ban(&phone).await.map_err(store_failed)?;
        // Its devices connected now (on any node) are ended; connecting
        // again is refused.
        let (mut disconnected, mut unanswered_nodes) = (0, 0);
        if let Some(account) = server.store.account_by_phone(&phone).await.map_err(store_failed)? {
            let devices: Vec<DeviceId> =
                server.store.active_devices(account.id).await.map_err(store_failed)?.iter().map(|d| d.id).collect();
            (disconnected, unanswered_nodes) = server.disconnect_devices(&devices).await;
        }
        Ok(Banned { phone: phone.to_string(), disconnected, unanswered_nodes })
    };
    caller.run("ban", &target, act).await
}

#[derive(Serialize)]
struct Unbanned {
    phone: String,
    was_banned: bool,
}

async fn unban(caller: Caller, Path(phone): Path<String>) -> Response {
    let act = async {
        let number = parse_phone(&phone)?;
        let was_banned = caller.admin.shared.server.bans.unban(&number).await.map_err(store_failed)?;
        Ok(Unbanned { phone: number.to_string(), was_banned })
    };
    caller.run("unban", &phone, act).await
}

#[derive(Serialize)]
struct Tested {
    /// What came of it, in words.
    outcome: String,
}

async fn test_sms(caller: Caller, body: axum::body::Bytes) -> Response {
    let (target, phone) = phone_body(&body);
    let act = async {
        let phone = phone?;
        caller.admin.shared.server.registration.test_sms(&phone).await.map_err(|e| {
            ApiError::new(StatusCode::BAD_GATEWAY, "sms_failed", format!("the SMS provider failed: {e}"))
        })?;
        Ok(Tested { outcome: format!("the SMS provider accepted a test message to {phone}") })
    };
    caller.run("test-sms", &target, act).await
}

async fn test_push(caller: Caller, Path(device): Path<u64>) -> Response {
    let act = async {
        let outcome = caller.admin.shared.server.pusher.test(DeviceId(device)).await.map_err(store_failed)?;
        Ok(Tested { outcome })
    };
    caller.run("test-push", &device.to_string(), act).await
}

fn store_failed(e: skylark_store::StoreError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_failed", format!("the store failed: {e}"))
}
