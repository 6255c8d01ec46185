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
    /// The number's account has two-step verification: the request must
    /// carry its PIN. The lock lapses at `lapses_at_ms` if the account is
    /// not used until then.
    #[error(
        "this number is protected by two-step verification: enter its {}-digit PIN (set by the number's owner)",
        skylark_core::pin::PIN_DIGITS
    )]
    PinRequired { lapses_at_ms: u64 },
    #[error("wrong PIN; {}", pin_left(*.attempts_left, *.retry_after_ms))]
    WrongPin { attempts_left: u32, retry_after_ms: u64 },
    #[error("too many wrong PINs in a row; try again in {}", skylark_core::words::wait(*.0))]
    PinWait(u64),
    #[error(
        "too many wrong PINs: this number cannot be registered again until its account has gone unused for a \
         while (it stays locked while its owner uses it)"
    )]
    PinLockedOut { lapses_at_ms: u64 },
    #[error("a PIN is {} digits", skylark_core::pin::PIN_DIGITS)]
    InvalidPin,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn pin_left(attempts_left: u32, retry_after_ms: u64) -> String {
    let left = skylark_core::words::count(u64::from(attempts_left), "attempt", "attempts");
    if retry_after_ms == 0 {
        format!("{left} left before the number is locked")
    } else {
        format!(
            "{left} left before the number is locked; the next can be made in {}",
            skylark_core::words::wait(retry_after_ms)
        )
    }
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
    /// Last-seen times not yet written, for when a lock lapses.
    devices: Arc<crate::devices::Devices>,
    policy: VerificationPolicy,
    prefix_digits: usize,
    sms_per_number: KeyedLimiter,
    sms_per_ip: KeyedLimiter,
    sms_per_prefix: KeyedLimiter,
    checks_per_number: KeyedLimiter,
    checks_per_ip: KeyedLimiter,
    /// PIN checks read, judge and write an account's record one at a time,
    /// so parallel guesses cannot share one count.
    pin_checks: tokio::sync::Mutex<()>,
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bans: Arc<crate::bans::Bans>,
        store: Arc<dyn Store>,
        sms: Arc<dyn SmsSender>,
        clock: Arc<dyn Clock>,
        sessions: Arc<Sessions>,
        devices: Arc<crate::devices::Devices>,
        policy: VerificationPolicy,
        limits: &RateLimits,
    ) -> Self {
        Self {
            bans,
            store,
            sms,
            clock,
            sessions,
            devices,
            policy,
            prefix_digits: limits.prefix_digits,
            sms_per_number: KeyedLimiter::new("sms_per_number", limits.sms_per_number),
            sms_per_ip: KeyedLimiter::new("sms_per_ip", limits.sms_per_ip),
            sms_per_prefix: KeyedLimiter::new("sms_per_prefix", limits.sms_per_prefix),
            checks_per_number: KeyedLimiter::new("checks_per_number", limits.checks_per_number),
            checks_per_ip: KeyedLimiter::new("checks_per_ip", limits.checks_per_ip),
            pin_checks: tokio::sync::Mutex::new(()),
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
        pin: Option<&str>,
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
        // The code is right; a locked number also needs its PIN (the
        // session stays, so the client can ask for it and try again).
        self.check_pin(&session.phone, pin).await?;
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

    /// The registration lock: for a number whose account has a PIN and was
    /// used within `pin_lapse_ms`, the PIN must come with the code. Wrong
    /// ones are counted on the account (across sessions and restarts), with
    /// growing waits and a lock-out (`skylark_core::pin`). A lapsed lock is
    /// removed, so a new owner of the number does not inherit it.
    async fn check_pin(&self, phone: &PhoneNumber, pin: Option<&str>) -> Result<(), RegistrationError> {
        let Some(account) = self.store.account_by_phone(phone).await? else { return Ok(()) };
        let _one_at_a_time = self.pin_checks.lock().await;
        let Some(mut record) = self.store.pin(account.id).await? else { return Ok(()) };
        let now = self.clock.now_ms();
        let lapses_at_ms = self.pin_lapses_at(account.id, &record, now).await?;
        if now >= lapses_at_ms {
            tracing::info!(account = %account.id, "registration lock lapsed; the PIN is removed");
            self.store.set_pin(account.id, None).await?;
            return Ok(());
        }
        let Some(pin) = pin.filter(|p| !p.is_empty()) else {
            return Err(RegistrationError::PinRequired { lapses_at_ms });
        };
        match record.guess(now) {
            skylark_core::pin::Guess::LockedOut => return Err(RegistrationError::PinLockedOut { lapses_at_ms }),
            skylark_core::pin::Guess::Wait(ms) => return Err(RegistrationError::PinWait(ms)),
            skylark_core::pin::Guess::Allowed => {}
        }
        let right = skylark_core::pin::valid_pin(pin) && verify_pin(pin, &record.hash).await;
        if right {
            if record.failures > 0 {
                record.failures = 0;
                self.store.set_pin(account.id, Some(record)).await?;
            }
            return Ok(());
        }
        let attempts_left = record.failed(now);
        let retry_after_ms = match record.guess(now) {
            skylark_core::pin::Guess::Wait(ms) => ms,
            _ => 0,
        };
        self.store.set_pin(account.id, Some(record)).await?;
        tracing::info!(account = %account.id, attempts_left, "wrong registration PIN");
        metrics::counter!("skylark_pin_failures_total").increment(1);
        Err(RegistrationError::WrongPin { attempts_left, retry_after_ms })
    }

    /// When the account's registration lock lapses: `pin_lapse_ms` after
    /// its last use (a device connected now, or the newest last-seen,
    /// written or not).
    async fn pin_lapses_at(
        &self,
        account: skylark_core::AccountId,
        record: &skylark_core::pin::PinRecord,
        now: u64,
    ) -> Result<u64, RegistrationError> {
        let mut last_active = 0;
        for device in self.store.active_devices(account).await? {
            if self.sessions.is_live_anywhere(account, device.id) {
                last_active = now;
            }
            last_active = last_active.max(self.devices.last_seen(&device).unwrap_or(device.created_at_ms));
        }
        Ok(skylark_core::pin::lapses_at(record, last_active, self.policy.pin_lapse_ms))
    }

    /// Sets the account's PIN (`None` removes it). Set or changed, it
    /// starts with no wrong guesses counted.
    pub async fn set_pin(&self, account: skylark_core::AccountId, pin: Option<&str>) -> Result<(), RegistrationError> {
        let record = match pin {
            None => None,
            Some(pin) if !skylark_core::pin::valid_pin(pin) => return Err(RegistrationError::InvalidPin),
            Some(pin) => Some(skylark_core::pin::PinRecord::new(hash_pin(pin).await?, self.clock.now_ms())),
        };
        let _one_at_a_time = self.pin_checks.lock().await;
        self.store.set_pin(account, record).await?;
        Ok(())
    }

    /// Whether the account has a PIN, and since when.
    pub async fn pin_set_at(&self, account: skylark_core::AccountId) -> Result<Option<u64>, RegistrationError> {
        Ok(self.store.pin(account).await?.map(|r| r.set_at_ms))
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

/// Argon2id with the crate's defaults (19 MiB, 2 passes: OWASP's advice for
/// Argon2id), off the async threads: it is slow on purpose.
async fn hash_pin(pin: &str) -> Result<String, RegistrationError> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let pin = pin.to_owned();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default().hash_password(pin.as_bytes(), &salt).map(|h| h.to_string())
    })
    .await
    .map_err(|_| RegistrationError::Store(StoreError::Invariant("the PIN hashing task failed".into())))?
    .map_err(|e| RegistrationError::Store(StoreError::Invariant(format!("hashing a PIN: {e}"))))
}

/// Whether `pin` matches the stored hash (false for an unreadable hash).
async fn verify_pin(pin: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let (pin, hash) = (pin.to_owned(), hash.to_owned());
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .is_ok_and(|parsed| argon2::Argon2::default().verify_password(pin.as_bytes(), &parsed).is_ok())
    })
    .await
    .unwrap_or(false)
}
