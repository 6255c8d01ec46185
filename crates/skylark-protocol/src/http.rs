//! The HTTP JSON API's request and response bodies (sign-up, linking,
//! Web Push key), shared by the server's gateway and the client SDK, so the
//! two cannot disagree on a field. docs/PROTOCOL.md ("Sign-up") is their prose.
//!
//! Readers ignore fields they do not know, as on the frame protocol: fields
//! are only ever added.

use serde::{Deserialize, Serialize};

/// `POST /v1/verification`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartVerification {
    /// In international form; separators are ignored.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^\+[1-9][0-9]{7,14}$", example = "+15551234567"))]
    pub phone: String,
}

/// How the verification code's SMS went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SmsStatus {
    /// "pending", "sent" or "failed".
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A verification session, as every verification endpoint answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerificationView {
    pub session_id: String,
    pub phone: String,
    pub code_expires_in_ms: u64,
    /// `None` when no more codes can be sent for this session.
    pub next_resend_in_ms: Option<u64>,
    pub sms: SmsStatus,
}

/// `POST /v1/verification/{id}/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerifyRequest {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9]{6}$", example = "123456"))]
    pub code: String,
    /// Base64 of the device's 32-byte Ed25519 public key.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub public_key: String,
    #[serde(default)]
    pub device_name: String,
    /// The number's two-step verification PIN, when its owner set one
    /// (answered `registration_locked` without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9]{6}$", example = "246810"))]
    pub pin: Option<String>,
}

/// A device enrolled by a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Registered {
    pub account_id: u64,
    pub device_id: u64,
    pub phone: String,
    pub device_name: String,
}

/// `POST /v1/links`: a new device asks to be linked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LinkRequest {
    /// Base64 of the new device's 32-byte Ed25519 public key.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub public_key: String,
    #[serde(default)]
    pub device_name: String,
}

/// A pending link, as the new device sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Link {
    pub link_id: String,
    /// Shown as `ABCD-EFGH`; typed or scanned on a signed-in device.
    pub code: String,
    pub expires_in_ms: u64,
    /// The code as a QR code (SVG), for screens (`null` if it could not be drawn).
    #[serde(default)]
    pub qr_svg: Option<String>,
}

/// `GET /v1/links/{id}`: the state of a pending link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum LinkStatus {
    Pending,
    Expired,
    Approved { account_id: u64, device_id: u64, phone: String },
}

/// `GET /v1/push/vapid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VapidKey {
    /// The uncompressed P-256 point, base64url without padding.
    pub public_key: String,
}

/// `GET /v1/nodes`: the nodes of a cluster that take devices now, with the
/// address each advertises (`host:port` of its HTTP listener, reached with
/// the same scheme as the node that answered). Empty on a single server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeList {
    pub nodes: Vec<NodeAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeAddress {
    pub node: String,
    pub address: String,
}

/// Every error answer: a stable name and a message in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    pub error: String,
    pub message: String,
    /// With rate limits (also in the `Retry-After` header, in seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// With a wrong code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts_left: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_keep_their_documented_shape() {
        let status = LinkStatus::Approved { account_id: 1, device_id: 2, phone: "+15550000001".into() };
        let text = serde_json::to_string(&status).unwrap_or_default();
        assert_eq!(text, r#"{"status":"approved","account_id":1,"device_id":2,"phone":"+15550000001"}"#);
        let pending: LinkStatus =
            serde_json::from_str(r#"{"status":"pending","later":true}"#).unwrap_or(LinkStatus::Expired);
        assert_eq!(pending, LinkStatus::Pending, "unknown fields are ignored");
        let error =
            ApiError { error: "too_large".into(), message: "m".into(), retry_after_ms: None, attempts_left: None };
        assert_eq!(serde_json::to_string(&error).unwrap_or_default(), r#"{"error":"too_large","message":"m"}"#);
    }
}
