//! Device authentication on each connection.

use rand::RngCore;
use skylark_core::auth::{AuthError, Challenge, verify_answer};
use skylark_core::{Account, Clock, Device, DeviceId};
use skylark_store::{Store, StoreError};
use std::sync::Arc;

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

pub struct Authenticator {
    /// Numbers the operator banned (none in unit tests of this module).
    bans: Option<Arc<crate::bans::Bans>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    server_id: [u8; 16],
    challenge_ttl_ms: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, server_id: [u8; 16], challenge_ttl_ms: u64) -> Self {
        Self { bans: None, store, clock, server_id, challenge_ttl_ms }
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
        transcript: &[u8],
        answered_nonce: &[u8],
        signature: &[u8],
    ) -> Result<Authenticated, AuthFailure> {
        let device = self.store.device(device_id).await?;
        let result =
            verify_answer(challenge, transcript, device.as_ref(), answered_nonce, signature, self.clock.now_ms());
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
