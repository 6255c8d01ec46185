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
pub mod content;
pub mod e2ee;
pub mod identity;
pub mod media;
pub mod session;
pub mod tls;

use skylark_protocol::{CloseCode, ErrorCode};

pub use client::Client;
pub use conn::Endpoint;
pub use identity::Identity;
pub use session::Session;
pub use tls::TlsClient;

/// What went wrong, in words a user can act on (the server's own message
/// where it sent one); the details stay in the fields for programs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("could not reach the server: {0}")]
    Io(String),
    #[error("the server sent something this client does not understand ({0}); update the client")]
    Protocol(String),
    /// The server answered a request with an error frame.
    #[error("{}", refused_words(message))]
    Refused { code: ErrorCode, message: String, retry_after_ms: u64 },
    /// The connection closed; `code` is the server's close code if it sent one.
    #[error("{}", closed_words(*code, reason))]
    Closed { code: Option<CloseCode>, reason: String },
    /// The HTTP API answered with an error.
    #[error("{}", refused_words(message))]
    Api { status: u16, error: String, message: String, retry_after_secs: Option<u64>, body: serde_json::Value },
    #[error("{0}")]
    Profile(String),
}

/// A refusal, as the server worded it (its messages say when to try again).
fn refused_words(message: &str) -> String {
    if message.is_empty() { "the server refused the request".to_owned() } else { message.to_owned() }
}

/// Why the connection ended, and what to do about it.
fn closed_words(code: Option<CloseCode>, reason: &str) -> String {
    let with_reason = |text: &str| {
        if reason.is_empty() || reason == "connection closed" { text.to_owned() } else { format!("{text} ({reason})") }
    };
    match code {
        Some(CloseCode::Replaced) => "this device connected to the server again from somewhere else, and the newer \
            connection took over (one connection per device)"
            .to_owned(),
        Some(CloseCode::DeviceRemoved) => "this device was removed from its account, or the number was registered \
            again on another phone; link this device again, or register"
            .to_owned(),
        Some(CloseCode::Unauthenticated) => with_reason("the server did not accept this device's credentials"),
        Some(CloseCode::UnsupportedVersion) => "the server does not speak this client's protocol version; update \
            the client"
            .to_owned(),
        Some(CloseCode::IdleTimeout) => "the server closed the connection after a long silence".to_owned(),
        Some(CloseCode::GoingAway) => "the server is shutting down or restarting; try again in a moment".to_owned(),
        Some(CloseCode::TryAgainLater) => with_reason("the server is busy; try again in a moment"),
        Some(CloseCode::TooLarge) => "a frame was larger than the server accepts".to_owned(),
        Some(CloseCode::ProtocolError) => with_reason("the server closed the connection after a protocol error"),
        Some(CloseCode::InternalError) => with_reason("the server had an internal error; try again"),
        Some(CloseCode::Normal | CloseCode::Unspecified) | None => with_reason("the connection to the server closed"),
    }
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
                matches!(
                    code,
                    ErrorCode::Internal | ErrorCode::ChallengeExpired | ErrorCode::RateLimited | ErrorCode::Unavailable
                )
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_words_not_rust_names() {
        let refused = ClientError::Refused {
            code: ErrorCode::UnknownRecipient,
            message: "no account has that phone number".into(),
            retry_after_ms: 0,
        };
        assert_eq!(refused.to_string(), "no account has that phone number");
        let limited = ClientError::Refused {
            code: ErrorCode::RateLimited,
            message: "too many messages; try again in 23 seconds".into(),
            retry_after_ms: 22_157,
        };
        assert_eq!(limited.to_string(), "too many messages; try again in 23 seconds");
        let removed = ClientError::Closed { code: Some(CloseCode::DeviceRemoved), reason: "device removed".into() };
        assert!(removed.to_string().starts_with("this device was removed"), "{removed}");
        let replaced = ClientError::Closed { code: Some(CloseCode::Replaced), reason: "replaced".into() };
        assert!(replaced.to_string().contains("newer connection took over"), "{replaced}");
        let api = ClientError::Api {
            status: 429,
            error: "resend_too_soon".into(),
            message: "a new code can be sent in 23 seconds".into(),
            retry_after_secs: Some(23),
            body: serde_json::Value::Null,
        };
        assert!(api.to_string().starts_with("a new code can be sent in 23 seconds"), "{api}");
        for e in [refused, limited, removed, replaced, api] {
            let text = e.to_string();
            assert!(!text.contains("Some(") && !text.contains("Unknown") && !text.contains(" ms"), "{text}");
        }
    }
}
