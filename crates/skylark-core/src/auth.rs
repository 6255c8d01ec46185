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

/// An answer that passed every check but the signature's: the key and the
/// signature left to verify, alone ([`Unverified::verify`]) or together
/// with others that arrived at the same time ([`verify_together`]).
#[derive(Debug, Clone)]
pub struct Unverified {
    key: VerifyingKey,
    signature: Signature,
}

/// Checks a device's answer to `challenge`, all but the signature itself.
/// `device` is what the store holds for the claimed device id, if anything.
pub fn check_answer(
    challenge: &Challenge,
    device: Option<&Device>,
    answered_nonce: &[u8],
    signature: &[u8],
    now_ms: u64,
) -> Result<Unverified, AuthError> {
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
    Ok(Unverified { key, signature })
}

impl Unverified {
    /// Verifies the signature over `transcript`: what the device had to sign
    /// (the protocol defines its bytes; this crate only checks the signature
    /// over them, so both ends build them with one function).
    pub fn verify(&self, transcript: &[u8]) -> Result<(), AuthError> {
        self.key.verify_strict(transcript, &self.signature).map_err(|_| AuthError::BadSignature)
    }
}

/// Verifies several answers at once, each over its transcript, with one
/// answer per answer, in order. Many signatures checked together cost about
/// half as much each as one at a time: one multi-scalar multiplication
/// instead of one per signature. A batch that fails is checked again one by
/// one, so a bad signature is refused alone and costs the others nothing
/// but time.
///
/// What a batch accepts: the batch equation holds for honest signatures,
/// and for a forged one only with negligible probability (its random
/// weights are drawn from every signature in it). It is not the strict
/// check of [`Unverified::verify`] in one respect: a signature its key's
/// holder deliberately made with a small-order component may pass. Only
/// that holder can make one, over a transcript that names this challenge,
/// so it grants nothing the holder does not have.
pub fn verify_together(answers: &[(&[u8], &Unverified)]) -> Vec<Result<(), AuthError>> {
    if answers.len() > 1 {
        let transcripts: Vec<&[u8]> = answers.iter().map(|(t, _)| *t).collect();
        let signatures: Vec<Signature> = answers.iter().map(|(_, a)| a.signature).collect();
        let keys: Vec<VerifyingKey> = answers.iter().map(|(_, a)| a.key).collect();
        if ed25519_dalek::verify_batch(&transcripts, &signatures, &keys).is_ok() {
            return vec![Ok(()); answers.len()];
        }
    }
    answers.iter().map(|(transcript, answer)| answer.verify(transcript)).collect()
}

/// Checks a device's answer to `challenge`, signature included (see
/// [`check_answer`] and [`Unverified::verify`]).
pub fn verify_answer(
    challenge: &Challenge,
    transcript: &[u8],
    device: Option<&Device>,
    answered_nonce: &[u8],
    signature: &[u8],
    now_ms: u64,
) -> Result<(), AuthError> {
    check_answer(challenge, device, answered_nonce, signature, now_ms)?.verify(transcript)
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

    #[test]
    fn answers_verified_together_refuse_only_the_bad_ones() {
        let keys: Vec<SigningKey> = (1..=6u8).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
        let nonces: Vec<[u8; 32]> = (1..=6u8).map(|i| [i + 100; 32]).collect();
        let answer = |signer: &SigningKey, owner: &SigningKey, nonce: &[u8; 32]| {
            let device = Device { public_key: owner.verifying_key().to_bytes(), ..setup().1 };
            let challenge = Challenge { nonce: *nonce, issued_at_ms: 1_000, ttl_ms: 500 };
            check_answer(&challenge, Some(&device), nonce, &sign(signer, nonce), 1_200).unwrap()
        };
        let transcripts: Vec<Vec<u8>> = nonces.iter().map(|n| transcript(b"srv", n)).collect();
        let good: Vec<Unverified> = keys.iter().zip(&nonces).map(|(k, n)| answer(k, k, n)).collect();
        let together = |answers: &[Unverified]| {
            let pairs: Vec<(&[u8], &Unverified)> = transcripts.iter().map(Vec::as_slice).zip(answers.iter()).collect();
            verify_together(&pairs)
        };
        assert_eq!(together(&good), vec![Ok(()); 6]);
        assert_eq!(together(&good[..1]), vec![Ok(())]);

        // Signed by another key, and signed over another nonce: each is
        // refused, and only it.
        let mut bad = good.clone();
        bad[2] = answer(&keys[3], &keys[2], &nonces[2]);
        bad[5] = Unverified { signature: good[4].signature, ..good[5].clone() };
        let refused = Err(AuthError::BadSignature);
        assert_eq!(together(&bad), vec![Ok(()), Ok(()), refused, Ok(()), Ok(()), refused]);
        assert_eq!(together(&bad[2..3]), vec![refused]);
    }
}
