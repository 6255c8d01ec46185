//! Device authentication: checking a device's answer to a connection challenge.
//!
//! The check is ordered so each failure has its own answer: an unknown or
//! removed device, a nonce that is not this connection's (a replay), an
//! expired challenge, then the signature itself.

use crate::account::Device;
use ed25519_dalek::{Signature, VerifyingKey};

/// A challenge issued to one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; 32],
    pub issued_at_ms: u64,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown device")]
    UnknownDevice,
    #[error("device was removed")]
    DeviceRemoved,
    #[error("the answered nonce is not this connection's challenge")]
    ChallengeMismatch,
    #[error("the challenge expired")]
    ChallengeExpired,
    #[error("signature does not verify")]
    BadSignature,
    #[error("this number is banned from this server; ask its operator")]
    Banned,
}

/// Parses a device public key, refusing bytes that are not a valid point.
pub fn parse_public_key(bytes: &[u8; 32]) -> Result<VerifyingKey, AuthError> {
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| AuthError::BadSignature)?;
    // Weak (small-order) keys would let anyone forge signatures that verify.
    if key.is_weak() {
        return Err(AuthError::BadSignature);
    }
    Ok(key)
}

/// Checks a device's answer to `challenge`. `device` is what the store holds
/// for the claimed device id, if anything; `transcript` is what the device
/// had to sign (the protocol defines its bytes; this crate only checks the
/// signature over them, so both ends build them with one function).
pub fn verify_answer(
    challenge: &Challenge,
    transcript: &[u8],
    device: Option<&Device>,
    answered_nonce: &[u8],
    signature: &[u8],
    now_ms: u64,
) -> Result<(), AuthError> {
    let device = device.ok_or(AuthError::UnknownDevice)?;
    if !device.is_active() {
        return Err(AuthError::DeviceRemoved);
    }
    if answered_nonce != challenge.nonce {
        return Err(AuthError::ChallengeMismatch);
    }
    if now_ms > challenge.issued_at_ms.saturating_add(challenge.ttl_ms) {
        return Err(AuthError::ChallengeExpired);
    }
    let key = parse_public_key(&device.public_key)?;
    let signature = Signature::from_slice(signature).map_err(|_| AuthError::BadSignature)?;
    key.verify_strict(transcript, &signature).map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::{AccountId, DeviceId};
    use ed25519_dalek::{Signer, SigningKey};

    fn setup() -> (SigningKey, Device, Challenge) {
        let key = SigningKey::from_bytes(&[9; 32]);
        let device = Device {
            id: DeviceId(5),
            account_id: AccountId(1),
            public_key: key.verifying_key().to_bytes(),
            name: "phone".into(),
            created_at_ms: 0,
            removed_at_ms: None,
            last_seen_ms: None,
        };
        (key, device, Challenge { nonce: [3; 32], issued_at_ms: 1_000, ttl_ms: 500 })
    }

    /// Stands in for the protocol's transcript: any bytes that bind the
    /// server, the nonce and the device.
    fn transcript(server: &[u8], nonce: &[u8; 32]) -> Vec<u8> {
        [server, nonce.as_slice(), &5u64.to_be_bytes()].concat()
    }

    fn sign(key: &SigningKey, nonce: &[u8; 32]) -> Vec<u8> {
        key.sign(&transcript(b"srv", nonce)).to_bytes().to_vec()
    }

    #[test]
    fn good_answer_passes() {
        let (key, device, ch) = setup();
        let sig = sign(&key, &ch.nonce);
        assert_eq!(verify_answer(&ch, &transcript(b"srv", &ch.nonce), Some(&device), &ch.nonce, &sig, 1_200), Ok(()));
    }

    #[test]
    fn each_failure_has_its_own_error() {
        let (key, mut device, ch) = setup();
        let sig = sign(&key, &ch.nonce);
        assert_eq!(
            verify_answer(&ch, &transcript(b"srv", &ch.nonce), None, &ch.nonce, &sig, 1_200),
            Err(AuthError::UnknownDevice)
        );
        let old = sign(&key, &[4; 32]);
        assert_eq!(
            verify_answer(&ch, &transcript(b"srv", &ch.nonce), Some(&device), &[4; 32], &old, 1_200),
            Err(AuthError::ChallengeMismatch)
        );
        assert_eq!(
            verify_answer(&ch, &transcript(b"srv", &ch.nonce), Some(&device), &ch.nonce, &sig, 1_501),
            Err(AuthError::ChallengeExpired)
        );
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            verify_answer(
                &ch,
                &transcript(b"srv", &ch.nonce),
                Some(&device),
                &ch.nonce,
                &sign(&other, &ch.nonce),
                1_200
            ),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_answer(&ch, &transcript(b"other-server", &ch.nonce), Some(&device), &ch.nonce, &sig, 1_200),
            Err(AuthError::BadSignature)
        );
        device.removed_at_ms = Some(1);
        assert_eq!(
            verify_answer(&ch, &transcript(b"srv", &ch.nonce), Some(&device), &ch.nonce, &sig, 1_200),
            Err(AuthError::DeviceRemoved)
        );
    }
}
