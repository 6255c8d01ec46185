//! Skylark's wire protocol, version 1.
//!
//! This crate owns what travels on a connection and nothing else: the
//! protobuf messages generated from `proto/skylark/v1/skylark.proto`, the
//! length-prefixed frame codec used on raw TCP ([`codec`]), and the proto3
//! JSON mapping used by browsers ([`json`]). It knows nothing about accounts,
//! storage or sockets; the gateway converts these wire types into domain
//! types, and the client SDK builds on them directly.

pub mod codec;
pub mod json;
pub mod samples;

/// The generated protobuf types of protocol v1.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/skylark.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/skylark.v1.serde.rs"));
}

pub use v1::{ClientFrame, CloseCode, ErrorCode, ServerFrame};

/// The lowest protocol version this build speaks.
pub const MIN_VERSION: u32 = 1;
/// The highest protocol version this build speaks.
pub const MAX_VERSION: u32 = 1;

/// WebSocket subprotocol for binary protobuf frames (the default when the
/// client names no subprotocol).
pub const WS_SUBPROTOCOL_PROTO: &str = "skylark.v1.proto";
/// WebSocket subprotocol for text frames holding the proto3 JSON mapping.
pub const WS_SUBPROTOCOL_JSON: &str = "skylark.v1.json";

/// Domain separator at the start of the signed authentication transcript.
pub const AUTH_TRANSCRIPT_CONTEXT: &[u8] = b"skylark-auth-v1\0";

/// The bytes a device signs to answer a challenge: a fixed context, the
/// server's identity, the connection's nonce and the device id. Binding the
/// server id and the nonce makes a signature useless on any other connection
/// or server.
pub fn auth_transcript(server_id: &[u8], nonce: &[u8], device_id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_TRANSCRIPT_CONTEXT.len() + server_id.len() + nonce.len() + 8);
    out.extend_from_slice(AUTH_TRANSCRIPT_CONTEXT);
    out.extend_from_slice(&(server_id.len() as u32).to_be_bytes());
    out.extend_from_slice(server_id);
    out.extend_from_slice(&(nonce.len() as u32).to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&device_id.to_be_bytes());
    out
}

impl CloseCode {
    /// Whether a client should reconnect by itself after this close.
    /// Replacement, removal and failed authentication need a person's
    /// decision; everything else is transient.
    pub fn allows_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::Replaced | CloseCode::DeviceRemoved | CloseCode::Unauthenticated | CloseCode::UnsupportedVersion
        )
    }

    /// The close code for a WebSocket status code, if it is one of ours.
    pub fn from_ws_status(status: u16) -> Option<CloseCode> {
        CloseCode::try_from(i32::from(status)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_binds_every_part() {
        let base = auth_transcript(b"server-a", &[1; 32], 7);
        assert_ne!(base, auth_transcript(b"server-b", &[1; 32], 7));
        assert_ne!(base, auth_transcript(b"server-a", &[2; 32], 7));
        assert_ne!(base, auth_transcript(b"server-a", &[1; 32], 8));
        // Length prefixes keep the parts from sliding into each other.
        assert_ne!(auth_transcript(b"ab", b"c", 1), auth_transcript(b"a", b"bc", 1));
    }

    #[test]
    fn close_codes_are_websocket_status_codes() {
        assert_eq!(CloseCode::Replaced as i32, 4004);
        assert_eq!(CloseCode::from_ws_status(4005), Some(CloseCode::DeviceRemoved));
        assert_eq!(CloseCode::from_ws_status(1234), None);
        assert!(!CloseCode::Replaced.allows_reconnect());
        assert!(CloseCode::GoingAway.allows_reconnect());
    }
}
