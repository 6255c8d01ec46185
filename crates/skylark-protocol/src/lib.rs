//! Skylark's wire protocol, version 1.
//!
//! This crate owns what travels on a connection and nothing else: the
//! protobuf messages generated from `proto/skylark/v1/skylark.proto`, the
//! length-prefixed frame codec used on raw TCP ([`codec`]), and the proto3
//! JSON mapping used by browsers ([`json`]). It knows nothing about accounts,
//! storage or sockets; the gateway converts these wire types into domain
//! types, and the client SDK builds on them directly.

pub mod codec;
pub mod http;
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

    /// The values of the test vector block in docs/PROTOCOL.md, by name.
    fn documented_vector() -> std::collections::HashMap<String, String> {
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let start = doc.find("**Test vector.**").expect("PROTOCOL.md has the transcript test vector");
        let block = &doc[start..];
        let block = &block[block.find("```text").expect("a text block follows") + 7..];
        let block = &block[..block.find("```").expect("the block ends")];
        block
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
    }

    #[test]
    fn the_documented_transcript_vector_holds() {
        use ed25519_dalek::{Signer, SigningKey, Verifier};
        // Computed by an independent Ed25519 implementation when written.
        let v = documented_vector();
        let seed: [u8; 32] = hex(&v["seed"]).try_into().expect("32-byte seed");
        let key = SigningKey::from_bytes(&seed);
        assert_eq!(key.verifying_key().to_bytes().to_vec(), hex(&v["public_key"]));
        let device: u64 = v["device_id"].parse().expect("device id");
        let transcript = auth_transcript(&hex(&v["server_id"]), &hex(&v["nonce"]), device);
        assert_eq!(transcript, hex(&v["transcript"]), "the transcript's bytes");
        let signature = key.sign(&transcript);
        assert_eq!(signature.to_bytes().to_vec(), hex(&v["signature"]));
        assert!(key.verifying_key().verify(&transcript, &signature).is_ok());
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
