//! The Skylark client SDK, used by the CLI, the tests and the load tool.
//!
//! - [`api`]: the registration HTTP API (start, resend, verify).
//! - [`identity`]: a device's key and ids, kept in a profile directory.
//! - [`conn`]: one raw connection (TCP or WebSocket, protobuf or JSON)
//!   sending and receiving frames, with no policy.
//! - [`session`]: an authenticated connection with a background task that
//!   matches replies to requests, sends heartbeats and delivers events.
//! - [`client`]: a session that reconnects by itself with exponential
//!   back-off and full jitter.
//!
//! It depends on the protocol crate only, never on server internals.

pub mod api;
pub mod backoff;
pub mod client;
pub mod conn;
pub mod identity;
pub mod session;
pub mod tls;

use skylark_protocol::{CloseCode, ErrorCode};

pub use client::Client;
pub use conn::Endpoint;
pub use identity::Identity;
pub use session::Session;
pub use tls::TlsClient;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(String),
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// The server answered a request with an error frame.
    #[error("refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String, retry_after_ms: u64 },
    /// The connection closed; `code` is the server's close code if it sent one.
    #[error("connection closed ({code:?}): {reason}")]
    Closed { code: Option<CloseCode>, reason: String },
    /// The HTTP API answered with an error.
    #[error("server answered {status}: {error}: {message}")]
    Api { status: u16, error: String, message: String, retry_after_secs: Option<u64>, body: serde_json::Value },
    #[error("{0}")]
    Profile(String),
}

impl ClientError {
    /// The protocol error code, if the server refused a request.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether reconnecting could help: false after a refusal the server
    /// will repeat (bad key, removed device) or a close that forbids it.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Io(_) => true,
            ClientError::Closed { code: None, .. } => true,
            ClientError::Closed { code: Some(code), .. } => code.allows_reconnect(),
            ClientError::Refused { code, .. } => {
                matches!(code, ErrorCode::Internal | ErrorCode::ChallengeExpired | ErrorCode::RateLimited)
            }
            _ => false,
        }
    }
}
