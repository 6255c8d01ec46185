//! Skylark's front end: everything that touches a socket.
//!
//! The gateway listens for HTTP (the JSON API, health, metrics and the
//! WebSocket endpoint `/v1/ws`) and for raw TCP. Both kinds of connection run
//! the same [`session`] state machine through the [`transport::Transport`]
//! trait: decode, authenticate, heartbeats, requests. Wire types are
//! converted to domain types here and nowhere else; the services it calls
//! (in `skylark-server`) never see protobuf or HTTP.
//!
//! One cancellation token and one task tracker form the shutdown tree: every
//! listener and handshake selects on the token, an authenticated connection
//! is ended through the session it holds (`Sessions::close_all`, run when
//! the token is cancelled), and [`Gateway::shutdown`] waits for the tracked
//! connections to close.

pub mod admin;
pub mod config;
mod convert;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod http;
mod media;
pub mod metrics_endpoint;
pub mod openapi;
mod requests;
mod session;
mod slots;
mod tcp;
pub mod tls;
mod transport;
mod web;
mod ws;

pub use config::{GatewayConfig, Settings};
use skylark_server::Server;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often [`Server::housekeeping`] runs.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);

/// State shared by every listener and connection.
#[derive(Clone)]
pub(crate) struct Shared {
    pub server: Arc<Server>,
    /// Addresses, TLS and the transport limits (shared, not copied, by
    /// every connection task).
    pub config: Arc<GatewayConfig>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub ready: Arc<AtomicBool>,
    /// Open connections per client address.
    pub slots: Arc<slots::IpSlots>,
}

/// A running gateway.
pub struct Gateway {
    http_addr: SocketAddr,
    tcp_addr: SocketAddr,
    admin_addr: SocketAddr,
    shared: Shared,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("http", &self.http_addr).field("tcp", &self.tcp_addr).finish()
    }
}

/// Connections the kernel may hold for `accept` (capped by
/// `net.core.somaxconn`). tokio's default of 1,024 overflows during a fast
/// ramp, and a dropped SYN costs the client a one-second retransmit.
const ACCEPT_BACKLOG: u32 = 65_535;

/// Binds one listener; a failure names the listener, its address and
/// what to do (another server, or another program, holds the port).
fn listen(addr: std::net::SocketAddr, what: &str, setting: &str) -> io::Result<TcpListener> {
    let bind = || {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    bind().map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => "another Skylark server (or another program) is using that port; stop it, \
                or choose another address"
                .to_owned(),
            io::ErrorKind::AddrNotAvailable => "that address is not one of this machine's".to_owned(),
            io::ErrorKind::PermissionDenied => "ports below 1024 need privileges; choose a higher one".to_owned(),
            _ => format!("{e}"),
        };
        io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {hint} ({setting})"))
    })
}

impl Gateway {
    /// Binds the configured addresses and starts serving.
    pub async fn start(server: Arc<Server>, config: GatewayConfig) -> io::Result<Gateway> {
        metrics_endpoint::install();
        let http_listener = listen(config.listen.http, "HTTP and WebSocket", "--http, or [listen] http")?;
        let tcp_listener = listen(config.listen.tcp, "raw TCP", "--tcp, or [listen] tcp")?;
        let admin_listener = listen(config.listen.admin, "the admin API and metrics", "--admin, or [listen] admin")?;
        let admin_addr = admin_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let tcp_addr = tcp_listener.local_addr()?;
        let shared = Shared {
            slots: slots::IpSlots::new(config.limits.max_connections_per_ip),
            server,
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            ready: Arc::new(AtomicBool::new(false)),
        };

        let tls = tls::acceptor(&shared)?;
        let http_listener = tls::HttpListener::start(http_listener, shared.clone(), tls.clone())?;
        shared.tracker.spawn(http::serve(http_listener, shared.clone()));
        shared.tracker.spawn(tcp::serve(tcp_listener, shared.clone(), tls.clone()));
        shared.tracker.spawn(admin::serve(admin_listener, shared.clone()));
        shared.tracker.spawn(housekeeping(shared.clone()));
        shared.tracker.spawn(expiry(shared.clone()));
        shared.tracker.spawn(idle_sweep(shared.clone()));
        shared.tracker.spawn(collect_media(shared.clone()));
        // Connections end with the sessions they hold, not each by waiting
        // on the token (see `Sessions::close_all`).
        let (token, server) = (shared.shutdown.clone(), shared.server.clone());
        shared.tracker.spawn(async move {
            token.cancelled().await;
            server.sessions.close_all();
        });
        shared.ready.store(true, Ordering::SeqCst);
        let secure = tls.is_some();
        tracing::info!(%http_addr, %tcp_addr, %admin_addr, tls = secure, "skylark listening (HTTP + WebSocket at /v1/ws, raw TCP; admin API and metrics)");
        Ok(Gateway { http_addr, tcp_addr, admin_addr, shared })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The admin API's and metrics' address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The token that stops this gateway when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Stops accepting, closes every connection with "going away", and
    /// waits (at most `drain`) for them to finish.
    pub async fn shutdown(self, drain: Duration) {
        self.shared.ready.store(false, Ordering::SeqCst);
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(drain, self.shared.tracker.wait()).await.is_err() {
            tracing::warn!(remaining = self.shared.tracker.len(), "connections still open after the drain period");
        }
    }
}

/// Ends the sessions whose device has been silent for longer than the idle
/// timeout (`Sessions::close_idle`), looking every sixteenth of it (at most
/// every half second): a vanished peer's socket is closed at most that late.
pub(crate) async fn idle_sweep(shared: Shared) {
    let idle = Duration::from_millis(shared.config.limits.idle_timeout_ms);
    let every = (idle / 16).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {
                let ended = shared.server.sessions.close_idle(idle);
                if ended > 0 {
                    tracing::debug!(ended, "closed connections silent past the idle timeout");
                }
            }
        }
    }
}

/// Disappearing messages: purges what is due every `expiry_sweep_ms`.
async fn expiry(shared: Shared) {
    let every = Duration::from_millis(shared.server.router.config().expiry_sweep_ms.max(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => match shared.server.expire_messages().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "purged expired messages"),
                Err(e) => tracing::warn!(error = %e, "purging expired messages failed; will try again"),
            },
        }
    }
}

/// Attachments: deletes expired blobs and abandoned uploads every
/// `media.collect_every_ms`.
async fn collect_media(shared: Shared) {
    let every = Duration::from_millis(shared.server.media.config().collect_every_ms.max(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => match shared.server.collect_media().await {
                Ok(done) if done.blobs + done.uploads > 0 => {
                    tracing::info!(blobs = done.blobs, uploads = done.uploads, "collected expired attachments");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "collecting expired attachments failed; will try again"),
            },
        }
    }
}

async fn housekeeping(shared: Shared) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => shared.server.housekeeping().await,
        }
    }
}
