//! Device authentication on each connection.

use rand::RngCore;
use skylark_core::auth::{AuthError, Challenge, Unverified, check_answer, verify_together};
use skylark_core::{Account, AccountId, Clock, Device, DeviceId};
use skylark_store::{Store, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    #[error(transparent)]
    Refused(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A device that proved itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub account: Account,
    pub device: Device,
}

impl Authenticated {
    pub fn identity(&self) -> Identity {
        Identity { account: self.account.id, device: self.device.id }
    }
}

/// Who an authenticated connection is: all a session keeps of its
/// [`Authenticated`], so an idle connection pays 16 bytes for it. The rare
/// request that needs the records (the phone number, the device's name)
/// reads them from the store, where they are also current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub account: AccountId,
    pub device: DeviceId,
}

pub struct Authenticator {
    /// Numbers the operator banned (none in unit tests of this module).
    bans: Option<Arc<crate::bans::Bans>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    server_id: [u8; 16],
    challenge_ttl_ms: u64,
    signatures: Signatures,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, server_id: [u8; 16], challenge_ttl_ms: u64) -> Self {
        Self { bans: None, store, clock, server_id, challenge_ttl_ms, signatures: Signatures::default() }
    }

    /// Refuses devices of banned numbers.
    pub fn with_bans(mut self, bans: Arc<crate::bans::Bans>) -> Self {
        self.bans = Some(bans);
        self
    }

    pub fn server_id(&self) -> [u8; 16] {
        self.server_id
    }

    /// A fresh challenge for one connection.
    pub fn challenge(&self) -> Challenge {
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        Challenge { nonce, issued_at_ms: self.clock.now_ms(), ttl_ms: self.challenge_ttl_ms }
    }

    /// Checks a device's answer to `challenge`: a signature over
    /// `transcript`, which the caller builds with the protocol's transcript
    /// function from [`Authenticator::server_id`], the challenge's nonce and
    /// `device_id` (this crate knows no wire format).
    pub async fn authenticate(
        &self,
        challenge: &Challenge,
        device_id: DeviceId,
        transcript: Vec<u8>,
        answered_nonce: &[u8],
        signature: &[u8],
    ) -> Result<Authenticated, AuthFailure> {
        let device = self.store.device(device_id).await?;
        let result = match check_answer(challenge, device.as_ref(), answered_nonce, signature, self.clock.now_ms()) {
            Ok(unverified) => self.signatures.verify(transcript, unverified).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            metrics::counter!("skylark_auth_failures_total", "reason" => auth_reason(e)).increment(1);
            return Err(e.into());
        }
        let device = device.ok_or(AuthError::UnknownDevice)?;
        let account = self.store.account(device.account_id).await?.ok_or_else(|| {
            StoreError::Corrupt(format!("device {} names missing account {}", device.id, device.account_id))
        })?;
        if self.bans.as_ref().is_some_and(|b| b.is_banned(&account.phone)) {
            metrics::counter!("skylark_auth_failures_total", "reason" => auth_reason(AuthError::Banned)).increment(1);
            return Err(AuthError::Banned.into());
        }
        Ok(Authenticated { account, device })
    }
}

/// The most signatures one batch verifies (beyond a few dozen, a bigger
/// batch saves little and keeps its first connection waiting longer).
const MOST_PER_BATCH: usize = 64;

/// Verifies the signatures of connections that answer their challenges at
/// the same moment together, in batches: a connection's task queues its
/// answer, lets the other ready tasks run once, then verifies every answer
/// queued by then, its own and theirs, and hands each its result. Nothing
/// waits for a batch to fill: an answer alone is verified alone, one turn of
/// the scheduler later; under a storm of connects, whatever arrived together
/// is verified together, at about half the cost each (measured in
/// docs/BENCHMARKS.md). Tasks on other worker threads take batches of their
/// own, so verification still runs on every core.
#[derive(Default)]
struct Signatures {
    queue: Mutex<Vec<Queued>>,
    /// Signatures verified in a batch of more than one, ever.
    together: AtomicU64,
}

struct Queued {
    transcript: Vec<u8>,
    answer: Unverified,
    result: oneshot::Sender<Result<(), AuthError>>,
}

impl Signatures {
    async fn verify(&self, transcript: Vec<u8>, answer: Unverified) -> Result<(), AuthError> {
        let (result, mut verified) = oneshot::channel();
        self.queue.lock().expect("signature queue").push(Queued { transcript, answer, result });
        tokio::task::yield_now().await;
        loop {
            match verified.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => return Err(AuthError::BadSignature),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<Queued> = {
                let mut queue = self.queue.lock().expect("signature queue");
                let first = queue.len().min(MOST_PER_BATCH);
                queue.drain(..first).collect()
            };
            if batch.is_empty() {
                // Another thread's task took this answer and is verifying it.
                // (Its sender is dropped unanswered only if that task
                // panicked: refused, as nothing verified it.)
                return verified.await.unwrap_or(Err(AuthError::BadSignature));
            }
            let answers: Vec<(&[u8], &Unverified)> =
                batch.iter().map(|q| (q.transcript.as_slice(), &q.answer)).collect();
            let results = verify_together(&answers);
            let checked = if batch.len() > 1 {
                self.together.fetch_add(batch.len() as u64, Ordering::Relaxed);
                "together"
            } else {
                "alone"
            };
            metrics::counter!("skylark_auth_signatures_total", "checked" => checked).increment(batch.len() as u64);
            for (queued, result) in batch.into_iter().zip(results) {
                // A connection that closed while queued no longer listens.
                let _ = queued.result.send(result);
            }
        }
    }
}

fn auth_reason(e: AuthError) -> &'static str {
    match e {
        AuthError::UnknownDevice => "unknown_device",
        AuthError::DeviceRemoved => "device_removed",
        AuthError::ChallengeMismatch => "challenge_mismatch",
        AuthError::ChallengeExpired => "challenge_expired",
        AuthError::BadSignature => "bad_signature",
        AuthError::Banned => "banned",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn answer(signer: &SigningKey, owner: &SigningKey, transcript: &[u8]) -> Unverified {
        let device = Device {
            id: DeviceId(1),
            account_id: skylark_core::AccountId(1),
            public_key: owner.verifying_key().to_bytes(),
            name: "phone".into(),
            created_at_ms: 0,
            removed_at_ms: None,
            last_seen_ms: None,
        };
        let challenge = Challenge { nonce: [7; 32], issued_at_ms: 0, ttl_ms: 10 };
        let signature = signer.sign(transcript).to_bytes();
        check_answer(&challenge, Some(&device), &[7; 32], &signature, 0).expect("all but the signature passes")
    }

    /// Connections answering together on one thread are verified in one
    /// batch; one bad signature among them is refused and the rest pass.
    /// A connection answering alone is verified alone.
    #[tokio::test(flavor = "current_thread")]
    async fn answers_that_arrive_together_are_verified_together() {
        let signatures = Arc::new(Signatures::default());
        let keys: Vec<SigningKey> = (1..=8u8).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
        let mut tasks = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let transcript = format!("connection {i}").into_bytes();
            let signer = if i == 5 { &keys[0] } else { key };
            let unverified = answer(signer, key, &transcript);
            let signatures = signatures.clone();
            tasks.push(tokio::spawn(async move { signatures.verify(transcript, unverified).await }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        let mut expected = vec![Ok(()); 8];
        expected[5] = Err(AuthError::BadSignature);
        assert_eq!(results, expected);
        assert_eq!(signatures.together.load(Ordering::Relaxed), 8, "all eight in one batch");

        let alone = answer(&keys[1], &keys[1], b"later");
        assert_eq!(signatures.verify(b"later".to_vec(), alone).await, Ok(()));
        assert_eq!(signatures.together.load(Ordering::Relaxed), 8, "the ninth answered alone");
        assert!(signatures.queue.lock().unwrap().is_empty());
    }
}
