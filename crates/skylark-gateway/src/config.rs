//! The gateway's settings — addresses, TLS and the transport limits — and
//! [`Settings`], the whole configuration file `skylark serve` reads: the
//! gateway's part and the services' part ([`skylark_server::Config`]) in
//! the TOML shape README.md documents (its example is checked to be these
//! defaults). Omitted keys keep their defaults; unknown keys are an error.

use serde::{Deserialize, Serialize};
use skylark_core::verification::VerificationPolicy;
use skylark_server::config::{RateLimits, SmsConfig};
use skylark_server::devices::DevicesConfig;
use skylark_server::media::MediaConfig;
use skylark_server::messaging::MessagingConfig;
use skylark_server::push::PushConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What the gateway needs: where to listen, TLS, and the transport limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayConfig {
    pub listen: Listen,
    pub tls: TlsConfig,
    pub limits: TransportLimits,
    /// The admin API's token and audit log (set by `skylark serve`).
    pub admin: crate::admin::AdminConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// HTTP API and WebSocket (`/v1/ws`).
    pub http: SocketAddr,
    /// Raw TCP with length-prefixed frames.
    pub tcp: SocketAddr,
    /// The operator's listener: the admin API and Prometheus metrics. Keep
    /// it private (loopback, or a management network).
    pub admin: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 7480)),
            tcp: SocketAddr::from(([127, 0, 0, 1], 7481)),
            admin: SocketAddr::from(([127, 0, 0, 1], 7482)),
        }
    }
}

/// TLS on both listeners (HTTP/WebSocket and TCP). Off unless both files
/// are given; `skylark serve --dev-tls` fills them with a self-signed
/// certificate for local use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// Limits of the connections themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Largest frame accepted or sent, in bytes, on every transport.
    pub max_frame_bytes: usize,
    /// A connection must authenticate within this time after it opens.
    pub auth_timeout_ms: u64,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// How often clients are asked to ping when otherwise idle.
    pub heartbeat_interval_ms: u64,
    /// WebSocket read buffer per connection. Small on purpose: the default
    /// of the WebSocket library is 128 KiB per connection.
    pub ws_read_buffer_bytes: usize,
    /// Largest HTTP request body accepted by the JSON API.
    pub http_body_bytes: usize,
    /// An HTTP client must send a request's complete headers within this
    /// time (also while a kept-alive connection waits for its next request).
    pub http_header_timeout_ms: u64,
    /// An HTTP request (body included) must complete within this time;
    /// longer than the longest long-poll (30 s).
    pub http_request_timeout_ms: u64,
    /// Open connections (TCP and WebSocket together) from one IP address.
    pub max_connections_per_ip: u32,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Limits::default().split().0
    }
}

/// The configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the embedded store keeps its file (and `--dev-tls` its certificate).
    pub data_dir: PathBuf,
    pub store: StoreSettings,
    pub listen: Listen,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub verification: VerificationPolicy,
    pub rate_limits: RateLimits,
    pub messaging: MessagingConfig,
    pub devices: DevicesConfig,
    pub push: PushConfig,
    /// Where verification codes go (the `[sms]` section below).
    pub sms: SmsConfig,
    /// Attachments: where their blobs are kept, sizes, quotas, retention.
    pub media: MediaConfig,
    /// Spans exported to an OpenTelemetry collector (the `[tracing]` section).
    pub tracing: TracingSettings,
    /// Cluster mode (docs/CLUSTER.md); absent: one node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<skylark_server::cluster::ClusterConfig>,
}

impl Default for Settings {
    fn default() -> Self {
        let server = skylark_server::Config::default();
        Self {
            data_dir: PathBuf::from("./skylark-data"),
            store: StoreSettings::default(),
            listen: Listen::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            verification: server.verification,
            rate_limits: server.rate_limits,
            messaging: server.messaging,
            devices: server.devices,
            push: server.push,
            sms: server.sms,
            media: server.media,
            tracing: TracingSettings::default(),
            cluster: None,
        }
    }
}

impl Settings {
    /// The services' part and the gateway's part.
    pub fn split(&self) -> (skylark_server::Config, GatewayConfig) {
        let (transport, service) = self.limits.split();
        let server = skylark_server::Config {
            limits: service,
            verification: self.verification,
            rate_limits: self.rate_limits,
            messaging: self.messaging,
            devices: self.devices,
            push: self.push.clone(),
            sms: self.sms.clone(),
            media: MediaConfig {
                dir: if self.media.dir.as_os_str().is_empty() {
                    self.data_dir.join("media")
                } else {
                    self.media.dir.clone()
                },
                ..self.media.clone()
            },
        };
        (
            server,
            GatewayConfig {
                listen: self.listen.clone(),
                tls: self.tls.clone(),
                limits: transport,
                admin: crate::admin::AdminConfig::default(),
            },
        )
    }
}

/// The file's `[tracing]`: spans (per connection, per message sent, per
/// forward between actors) exported over OTLP/HTTP to an OpenTelemetry
/// collector. Off unless an endpoint is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSettings {
    /// The collector's OTLP/HTTP address, such as `http://127.0.0.1:4318` (spans go to `/v1/traces`); empty: none are exported.
    pub otlp_endpoint: String,
    /// The `service.name` the spans are reported under.
    pub service_name: String,
    /// Which spans to export, as a log filter.
    pub filter: String,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "skylark".to_owned(),
            filter: "skylark_gateway=debug,skylark_server=debug".to_owned(),
        }
    }
}

/// The file's `[store]`: where the durable state lives. With no shards,
/// the embedded store (one redb file in `data_dir`); with one or more
/// PostgreSQL URLs, the PostgreSQL store, accounts spread over them (the
/// first also holds the directory). docs/OPERATIONS.md explains each key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// PostgreSQL URLs, one per shard, in a fixed order.
    pub shards: Vec<String>,
    /// Connections per shard.
    pub pool_size: u32,
    /// Writes merged into one commit, at most.
    pub max_batch: usize,
    /// Group commits in flight at once, per shard.
    pub commit_tasks: usize,
    /// PostgreSQL's `synchronous_commit` (`on`, `remote_apply`,
    /// `remote_write` or `local`; never `off`).
    pub synchronous_commit: String,
    /// How long a request waits for a database connection before failing.
    pub acquire_timeout_ms: u64,
    /// The embedded store only: how many nice levels (0 to 19) below the network threads its committer thread runs. Lower, it commits what they queued while it waited, in fewer and larger commits, when the server shares a core; 0 keeps it level, for a host where other programs keep the CPU busy (a nice value weighs against them too).
    pub committer_nice: u8,
}

impl Default for StoreSettings {
    /// The PostgreSQL store's own defaults.
    fn default() -> Self {
        let pg = skylark_store::PgOptions::default();
        Self {
            shards: pg.shards,
            pool_size: pg.pool_size,
            max_batch: pg.max_batch,
            commit_tasks: pg.commit_tasks,
            synchronous_commit: pg.synchronous_commit,
            acquire_timeout_ms: pg.acquire_timeout.as_millis() as u64,
            committer_nice: skylark_store::redb_store::COMMITTER_NICE,
        }
    }
}

impl StoreSettings {
    /// The PostgreSQL store's options from these settings.
    pub fn pg_options(&self) -> skylark_store::PgOptions {
        skylark_store::PgOptions {
            shards: self.shards.clone(),
            pool_size: self.pool_size,
            max_batch: self.max_batch,
            commit_tasks: self.commit_tasks,
            synchronous_commit: self.synchronous_commit.clone(),
            acquire_timeout: std::time::Duration::from_millis(self.acquire_timeout_ms),
        }
    }
}

/// The file's `[limits]`: the transport's and two of the services'. The
/// fields are listed here rather than flattened from the two parts because
/// serde cannot refuse unknown keys in a flattened struct, and a typo in a
/// limit must be an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted or sent, in bytes, on every transport (a larger one closes the connection).
    pub max_frame_bytes: usize,
    /// A connection must authenticate within this time after it opens.
    pub auth_timeout_ms: u64,
    /// How long a connection's challenge nonce stays valid (services).
    pub challenge_ttl_ms: u64,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// How often clients are told to send a heartbeat (below the idle timeout).
    pub heartbeat_interval_ms: u64,
    /// The WebSocket read buffer per connection, in bytes.
    pub ws_read_buffer_bytes: usize,
    /// Largest HTTP request body, in bytes.
    pub http_body_bytes: usize,
    /// An HTTP request's headers must arrive within this time.
    pub http_header_timeout_ms: u64,
    /// An HTTP request must be answered within this time (a link long-poll waits at most 30 s).
    pub http_request_timeout_ms: u64,
    /// How long a typing indicator lasts unless refreshed (services).
    pub typing_ttl_ms: u64,
    /// Open connections per client IP address; more are refused before the handshake.
    pub max_connections_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        let service = skylark_server::config::Limits::default();
        Self {
            max_frame_bytes: 128 * 1024,
            auth_timeout_ms: 20_000,
            challenge_ttl_ms: service.challenge_ttl_ms,
            idle_timeout_ms: 45_000,
            heartbeat_interval_ms: 25_000,
            ws_read_buffer_bytes: 4 * 1024,
            http_body_bytes: 16 * 1024,
            http_header_timeout_ms: 10_000,
            http_request_timeout_ms: 40_000,
            typing_ttl_ms: service.typing_ttl_ms,
            max_connections_per_ip: 256,
        }
    }
}

impl Limits {
    fn split(&self) -> (TransportLimits, skylark_server::config::Limits) {
        let transport = TransportLimits {
            max_frame_bytes: self.max_frame_bytes,
            auth_timeout_ms: self.auth_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            ws_read_buffer_bytes: self.ws_read_buffer_bytes,
            http_body_bytes: self.http_body_bytes,
            http_header_timeout_ms: self.http_header_timeout_ms,
            http_request_timeout_ms: self.http_request_timeout_ms,
            max_connections_per_ip: self.max_connections_per_ip,
        };
        let service = skylark_server::config::Limits {
            challenge_ttl_ms: self.challenge_ttl_ms,
            typing_ttl_ms: self.typing_ttl_ms,
        };
        (transport, service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_defaults_and_splits_into_both_parts() {
        let settings: Settings = serde_json::from_value(serde_json::json!({
            "data_dir": "/var/lib/skylark",
            "limits": { "max_frame_bytes": 65536, "typing_ttl_ms": 5000 },
            "sms": { "provider": "http", "url": "http://127.0.0.1:9000/send",
                     "headers": { "Authorization": "Bearer x" } }
        }))
        .expect("parses");
        let (server, gateway) = settings.split();
        assert_eq!(gateway.limits.max_frame_bytes, 65536);
        assert_eq!(gateway.limits.idle_timeout_ms, TransportLimits::default().idle_timeout_ms);
        assert_eq!(server.limits.typing_ttl_ms, 5000);
        assert!(matches!(server.sms, SmsConfig::Http { timeout_ms: 5_000, .. }));
    }

    #[test]
    fn unknown_keys_are_refused() {
        for bad in [serde_json::json!({ "limitz": {} }), serde_json::json!({ "limits": { "idle_timeout": 5 } })] {
            let err = serde_json::from_value::<Settings>(bad).expect_err("refused");
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
    }
}
