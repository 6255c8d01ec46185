//! Phone registration: verification sessions, SMS codes and enrolment of a
//! number's first device.
//!
//! Starting a session never looks at whether the number has an account, so
//! its answer cannot reveal it. Each session is stored before its SMS is
//! sent, so a failing provider loses nothing: the client sees the failure
//! and asks for a resend. Verifying enrols the device; for a number that
//! already has an account, the account is taken over and its old devices
//! are removed and disconnected.

use crate::config::RateLimits;
use crate::ratelimit::{KeyedLimiter, Limited};
use crate::sessions::{Disconnect, Sessions};
use crate::sms::{SmsSender, send_with_retry};
use rand::{Rng, RngCore};
use skylark_core::account::clean_device_name;
use skylark_core::phone::PhoneError;
use skylark_core::verification::{CheckError, Delivery, ResendError, VerificationPolicy, VerificationSession};
use skylark_core::{Clock, NewDevice, PhoneNumber};
use skylark_store::{Store, StoreError};
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("invalid phone number: {0}")]
    InvalidPhone(#[from] PhoneError),
    #[error("{}; try again in {}", .0.what(), skylark_core::words::wait(u64::try_from(.0.retry_after.as_millis()).unwrap_or(u64::MAX)))]
    RateLimited(Limited),
    #[error("no such verification session")]
    UnknownSession,
    #[error("this number is banned from this server; ask its operator")]
    Banned,
    #[error(transparent)]
    Resend(#[from] ResendError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("invalid public key: {0}")]
    InvalidKey(&'static str),
    #[error("invalid device name: {0}")]
    InvalidName(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Limited> for RegistrationError {
    fn from(l: Limited) -> Self {
        RegistrationError::RateLimited(l)
    }
}

/// What a client learns about its verification session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub session_id: String,
    pub phone: PhoneNumber,
    pub code_expires_at_ms: u64,
    /// `None` once no more codes can be sent.
    pub next_resend_at_ms: Option<u64>,
    pub delivery: Delivery,
}

pub use skylark_store::Registration as Registered;

pub struct Registration {
    bans: Arc<crate::bans::Bans>,
    store: Arc<dyn Store>,
    sms: Arc<dyn SmsSender>,
    clock: Arc<dyn Clock>,
    sessions: Arc<Sessions>,
    policy: VerificationPolicy,
    prefix_digits: usize,
    sms_per_number: KeyedLimiter,
    sms_per_ip: KeyedLimiter,
    sms_per_prefix: KeyedLimiter,
    checks_per_number: KeyedLimiter,
    checks_per_ip: KeyedLimiter,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("policy", &self.policy).finish_non_exhaustive()
    }
}

fn new_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sms_text(code: &str) -> String {
    format!("Your Skylark code is {code}. Do not share it with anyone.")
}

impl Registration {
    pub fn new(
        bans: Arc<crate::bans::Bans>,
        store: Arc<dyn Store>,
        sms: Arc<dyn SmsSender>,
        clock: Arc<dyn Clock>,
        sessions: Arc<Sessions>,
        policy: VerificationPolicy,
        limits: &RateLimits,
    ) -> Self {
        Self {
            bans,
            store,
            sms,
            clock,
            sessions,
            policy,
            prefix_digits: limits.prefix_digits,
            sms_per_number: KeyedLimiter::new("sms_per_number", limits.sms_per_number),
            sms_per_ip: KeyedLimiter::new("sms_per_ip", limits.sms_per_ip),
            sms_per_prefix: KeyedLimiter::new("sms_per_prefix", limits.sms_per_prefix),
            checks_per_number: KeyedLimiter::new("checks_per_number", limits.checks_per_number),
            checks_per_ip: KeyedLimiter::new("checks_per_ip", limits.checks_per_ip),
        }
    }

    pub fn policy(&self) -> &VerificationPolicy {
        &self.policy
    }

    fn check_sms_limits(&self, phone: &PhoneNumber, ip: IpAddr) -> Result<(), Limited> {
        // The address is checked first so one client cannot drain the
        // per-number budget of numbers it does not own.
        self.sms_per_ip.check(&ip.to_string())?;
        self.sms_per_prefix.check(phone.prefix(self.prefix_digits))?;
        self.sms_per_number.check(phone.as_str())
    }

    fn view(&self, s: &VerificationSession) -> SessionView {
        SessionView {
            session_id: s.id.clone(),
            phone: s.phone.clone(),
            code_expires_at_ms: s.code_expires_at_ms(&self.policy),
            next_resend_at_ms: s.next_resend_at_ms(&self.policy),
            delivery: s.delivery.clone(),
        }
    }

    /// Stores the session, sends its current code, and stores the outcome.
    async fn deliver(&self, mut session: VerificationSession) -> Result<SessionView, RegistrationError> {
        self.store.put_verification(&session).await?;
        let code = session.code().to_owned();
        session.delivery = match send_with_retry(self.sms.as_ref(), &session.phone, &sms_text(&code), &code).await {
            Ok(()) => Delivery::Sent,
            Err(e) => Delivery::Failed(e.to_string()),
        };
        self.store.put_verification(&session).await?;
        Ok(self.view(&session))
    }

    /// Starts a verification session for `phone` and sends its first code.
    pub async fn start(&self, phone: &str, ip: IpAddr) -> Result<SessionView, RegistrationError> {
        let phone = PhoneNumber::parse(phone)?;
        if self.bans.is_banned(&phone) {
            return Err(RegistrationError::Banned);
        }
        self.check_sms_limits(&phone, ip)?;
        let session = VerificationSession::start(new_session_id(), phone, new_code(), self.clock.now_ms());
        self.deliver(session).await
    }

    /// The operator's test of the SMS provider: one message to `phone`,
    /// with no code in it.
    pub async fn test_sms(&self, phone: &PhoneNumber) -> Result<(), crate::sms::SmsError> {
        let text = "This is a test message from your Skylark server's operator; nothing to do.";
        send_with_retry(self.sms.as_ref(), phone, text, "").await
    }

    pub async fn status(&self, session_id: &str) -> Result<SessionView, RegistrationError> {
        let session = self.store.verification(session_id).await?.ok_or(RegistrationError::UnknownSession)?;
        Ok(self.view(&session))
    }

    /// Sends a new code for an existing session.
    pub async fn resend(&self, session_id: &str, ip: IpAddr) -> Result<SessionView, RegistrationError> {
        let mut session = self.store.verification(session_id).await?.ok_or(RegistrationError::UnknownSession)?;
        if self.bans.is_banned(&session.phone) {
            return Err(RegistrationError::Banned);
        }
        // The session's own resend rules come first: they are free to check
        // and give the more precise answer.
        let now = self.clock.now_ms();
        let mut probe = session.clone();
        probe.resend(String::new(), now, &self.policy)?;
        self.check_sms_limits(&session.phone, ip)?;
        session.resend(new_code(), now, &self.policy)?;
        self.deliver(session).await
    }

    /// Checks the code and, if right, registers the number with `public_key`
    /// as its newest device. Old devices of a taken-over account are
    /// disconnected with [`Disconnect::DeviceRemoved`].
    pub async fn verify(
        &self,
        session_id: &str,
        code: &str,
        public_key: &[u8],
        device_name: &str,
        ip: IpAddr,
    ) -> Result<Registered, RegistrationError> {
        let public_key: [u8; 32] =
            public_key.try_into().map_err(|_| RegistrationError::InvalidKey("expected 32 bytes"))?;
        ed25519_check(&public_key)?;
        let name = clean_device_name(device_name).map_err(RegistrationError::InvalidName)?;

        self.checks_per_ip.check(&ip.to_string())?;
        let mut session = self.store.verification(session_id).await?.ok_or(RegistrationError::UnknownSession)?;
        if self.bans.is_banned(&session.phone) {
            return Err(RegistrationError::Banned);
        }
        self.checks_per_number.check(session.phone.as_str())?;

        if let Err(e) = session.check(code, self.clock.now_ms(), &self.policy) {
            // Wrong guesses must count even across restarts.
            self.store.put_verification(&session).await?;
            return Err(e.into());
        }
        let registered =
            self.store.register(&session.phone, NewDevice { public_key, name }, self.clock.now_ms()).await?;
        self.store.delete_verification(session_id).await?;
        for device in &registered.removed_devices {
            self.sessions.disconnect(*device, Disconnect::DeviceRemoved);
        }
        tracing::info!(
            account = %registered.account.id,
            device = %registered.device.id,
            created = registered.created,
            removed = registered.removed_devices.len(),
            "number verified"
        );
        Ok(registered)
    }

    /// Drops rate-limit state for keys that have been quiet long enough.
    pub fn forget_idle_limits(&self) {
        for limiter in
            [&self.sms_per_number, &self.sms_per_ip, &self.sms_per_prefix, &self.checks_per_number, &self.checks_per_ip]
        {
            limiter.forget_idle();
        }
    }
}

/// Refuses byte strings that are not a valid Ed25519 public key, so a
/// device never enrols with a key nobody can sign for.
fn ed25519_check(key: &[u8; 32]) -> Result<(), RegistrationError> {
    skylark_core::auth::parse_public_key(key)
        .map(|_| ())
        .map_err(|_| RegistrationError::InvalidKey("not an ed25519 point"))
}
