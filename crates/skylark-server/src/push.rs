//! Waking devices that have no live connection.
//!
//! A push is a content-free wake-up ("you have messages; connect"), never
//! the message itself. When an account receives messages, [`Pusher::wake`]
//! schedules its devices for a push after `delay_ms`; more messages in
//! that window join the same push (one per device per burst). When the
//! delay ends, each device of the account that has a push target, no live
//! connection, and unacknowledged entries gets one push, retried with
//! back-off; a 404 or 410 from the push service means the subscription is
//! gone, and the registration is removed. Typing and presence never cause
//! a push.
//!
//! Providers: Web Push (RFC 8030 delivery, RFC 8291 `aes128gcm` payload
//! encryption, RFC 8292 VAPID with a key the server generates and keeps),
//! UnifiedPush (a POST to the distributor's endpoint), and a webhook (JSON
//! to a configured URL, for gateways to FCM or APNs).

use crate::config::Quota;
use crate::http_client::{HttpClient, Outcome, new_client, parse_url, post};
use crate::sessions::Sessions;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hkdf::Hkdf;
use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use rand::RngCore;
use sha2::Sha256;
use skylark_core::{AccountId, Clock, DeviceId};
use skylark_store::{PushTarget, Store, StoreError};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Wait this long after a message before waking a device, so a device
    /// that reconnects anyway is not woken, and a burst makes one push.
    pub delay_ms: u64,
    /// Attempts per push before giving up.
    pub attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_base_ms: u64,
    /// How long one push request may take.
    pub timeout_ms: u64,
    /// The VAPID `sub` claim: how a push service can reach the operator.
    pub vapid_subject: String,
    /// Where webhook targets are delivered; webhook registrations are
    /// refused when unset.
    pub webhook_url: Option<String>,
    /// Headers sent with every webhook request (an API key).
    #[serde(default)]
    pub webhook_headers: BTreeMap<String, String>,
    /// Push registrations changed per device.
    pub registrations_per_device: Quota,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            delay_ms: 2_000,
            attempts: 4,
            retry_base_ms: 500,
            timeout_ms: 10_000,
            vapid_subject: "mailto:admin@localhost".into(),
            webhook_url: None,
            webhook_headers: BTreeMap::new(),
            registrations_per_device: Quota { burst: 10, per_ms: 60_000 },
        }
    }
}

/// The wake-up every provider sends: no content, just a reason to connect.
pub const WAKE_PAYLOAD: &[u8] = br#"{"type":"wake"}"#;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Invalid(String),
    #[error("rate limited")]
    RateLimited,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The server's VAPID key pair (P-256).
struct Vapid {
    key: p256::ecdsa::SigningKey,
    /// Uncompressed public key, as clients need it.
    public: Vec<u8>,
}

/// A random P-256 secret key from 32 random bytes (retried in the
/// negligible case that they are not a valid scalar).
fn random_secret() -> SecretKey {
    loop {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        if let Ok(key) = SecretKey::from_slice(&bytes) {
            return key;
        }
    }
}

/// Encrypts `plaintext` for a user agent as one `aes128gcm` record (RFC 8291
/// on top of RFC 8188). `salt` and `server_key` are fresh per message.
pub fn encrypt_web_push(
    plaintext: &[u8],
    ua_public: &[u8],
    auth_secret: &[u8],
    salt: [u8; 16],
    server_key: &SecretKey,
) -> Result<Vec<u8>, String> {
    let ua = PublicKey::from_sec1_bytes(ua_public).map_err(|_| "p256dh is not a P-256 point".to_owned())?;
    let as_public = server_key.public_key().to_encoded_point(false);
    let shared = p256::ecdh::diffie_hellman(server_key.to_nonzero_scalar(), ua.as_affine());
    // IKM = HKDF(salt = auth secret, ikm = ECDH secret, info = "WebPush: info" 0 ua as).
    let mut info = b"WebPush: info\0".to_vec();
    info.extend_from_slice(ua_public);
    info.extend_from_slice(as_public.as_bytes());
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth_secret), shared.raw_secret_bytes())
        .expand(&info, &mut ikm)
        .map_err(|e| e.to_string())?;
    let prk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
    let mut cek = [0u8; 16];
    let mut nonce = [0u8; 12];
    prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek).map_err(|e| e.to_string())?;
    prk.expand(b"Content-Encoding: nonce\0", &mut nonce).map_err(|e| e.to_string())?;
    // One record: the plaintext, then the last-record delimiter 0x02.
    let mut record = plaintext.to_vec();
    record.push(2);
    let cipher = Aes128Gcm::new_from_slice(&cek).map_err(|e| e.to_string())?;
    let sealed = cipher.encrypt(Nonce::from_slice(&nonce), record.as_slice()).map_err(|e| e.to_string())?;
    // Header: salt, record size, key id length, key id (the server's public key).
    let mut body = Vec::with_capacity(16 + 4 + 1 + 65 + sealed.len());
    body.extend_from_slice(&salt);
    body.extend_from_slice(&4096u32.to_be_bytes());
    body.push(as_public.as_bytes().len() as u8);
    body.extend_from_slice(as_public.as_bytes());
    body.extend_from_slice(&sealed);
    Ok(body)
}

impl Vapid {
    /// The `Authorization` header value for a push to `endpoint` (RFC 8292).
    fn authorization(&self, endpoint: &hyper::Uri, subject: &str, now_ms: u64) -> String {
        let audience = format!(
            "{}://{}",
            endpoint.scheme_str().unwrap_or("https"),
            endpoint.authority().map(|a| a.as_str()).unwrap_or("")
        );
        let header = B64URL.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let exp = now_ms / 1000 + 12 * 3600;
        let claims = B64URL.encode(serde_json::json!({ "aud": audience, "exp": exp, "sub": subject }).to_string());
        let signing_input = format!("{header}.{claims}");
        let signature: p256::ecdsa::Signature = self.key.sign(signing_input.as_bytes());
        format!("vapid t={signing_input}.{}, k={}", B64URL.encode(signature.to_bytes()), B64URL.encode(&self.public))
    }
}

struct Inner {
    store: Arc<dyn Store>,
    sessions: Arc<Sessions>,
    clock: Arc<dyn Clock>,
    config: PushConfig,
    client: HttpClient,
    vapid: Vapid,
    webhook: Option<hyper::Uri>,
    /// Accounts with a push already scheduled, and when each is due (in
    /// the order they were scheduled, which is the order they fall due:
    /// the delay is one setting).
    scheduled: Mutex<Schedule>,
    /// Tells the one task that runs due pushes that the schedule gained an
    /// account.
    scheduled_more: tokio::sync::Notify,
    registrations: crate::ratelimit::KeyedLimiter,
    shutdown: CancellationToken,
    /// Every scheduled and running push, so shutdown waits for them (they
    /// hold the store).
    tasks: TaskTracker,
}

/// The accounts waiting for their push (see [`Pusher::wake`]).
#[derive(Default)]
struct Schedule {
    accounts: HashSet<AccountId>,
    due: std::collections::VecDeque<(tokio::time::Instant, AccountId)>,
    /// Whether the task that runs due pushes was started (on the first
    /// wake, from within the runtime).
    running: bool,
}

#[derive(Clone)]
pub struct Pusher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").finish_non_exhaustive()
    }
}

/// How one push attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Delivered,
    /// The subscription no longer exists (404/410): stop using it.
    Gone,
    Retry(String),
    Fail(String),
}

impl Pusher {
    /// Loads (or creates) the VAPID key and builds the pusher.
    pub async fn new(
        store: Arc<dyn Store>,
        sessions: Arc<Sessions>,
        clock: Arc<dyn Clock>,
        config: PushConfig,
    ) -> Result<Pusher, PushError> {
        let candidate = random_secret().to_bytes().to_vec();
        let stored = store.secret("vapid", candidate).await?;
        let secret =
            SecretKey::from_slice(&stored).map_err(|_| PushError::Invalid("stored VAPID key is corrupt".into()))?;
        let public = secret.public_key().to_encoded_point(false).as_bytes().to_vec();
        let vapid = Vapid { key: p256::ecdsa::SigningKey::from(secret), public };
        let webhook = config.webhook_url.as_deref().map(parse_url).transpose().map_err(PushError::Invalid)?;
        let registrations = crate::ratelimit::KeyedLimiter::new("push_registrations", config.registrations_per_device);
        Ok(Pusher {
            inner: Arc::new(Inner {
                store,
                sessions,
                clock,
                config,
                client: new_client(),
                vapid,
                webhook,
                scheduled: Mutex::new(Schedule::default()),
                scheduled_more: tokio::sync::Notify::new(),
                registrations,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    /// The VAPID public key (uncompressed P-256 point) for subscriptions.
    pub fn vapid_public_key(&self) -> &[u8] {
        &self.inner.vapid.public
    }

    /// Housekeeping: drops idle rate-limit state.
    pub fn sweep(&self) {
        self.inner.registrations.forget_idle();
    }

    /// Stops scheduled pushes and those in progress, and waits for them.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Sets or (with `None`) removes a device's push target.
    pub async fn register(&self, device: DeviceId, target: Option<PushTarget>) -> Result<(), PushError> {
        self.inner.registrations.check(&device.to_string()).map_err(|_| PushError::RateLimited)?;
        match &target {
            Some(PushTarget::WebPush { endpoint, p256dh, .. }) => {
                parse_url(endpoint).map_err(PushError::Invalid)?;
                PublicKey::from_sec1_bytes(p256dh)
                    .map_err(|_| PushError::Invalid("p256dh is not a P-256 point".into()))?;
            }
            Some(PushTarget::UnifiedPush { endpoint }) => {
                parse_url(endpoint).map_err(PushError::Invalid)?;
            }
            Some(PushTarget::Webhook { .. }) if self.inner.webhook.is_none() => {
                return Err(PushError::Invalid("this server has no push webhook configured".into()));
            }
            Some(PushTarget::Webhook { .. }) | None => {}
        }
        self.inner.store.set_push_target(device, target).await?;
        Ok(())
    }

    /// The operator's test: one wake-up to `device` now, whatever its
    /// state, and what came of it in words. Nothing is retried or removed.
    pub async fn test(&self, device: DeviceId) -> Result<String, StoreError> {
        let Some(target) = self.inner.store.push_target(device).await? else {
            return Ok(format!("device {device} has no push registration (it registers one itself, from its app)"));
        };
        Ok(match self.send(device, &target).await {
            Sent::Delivered => "the push service accepted the wake-up".to_owned(),
            Sent::Gone => {
                "the push service says this subscription no longer exists; the device must register again".to_owned()
            }
            Sent::Retry(why) | Sent::Fail(why) => format!("the push failed: {why}"),
        })
    }

    /// `account` received messages: wake its offline devices after the delay.
    ///
    /// Called for every write that stores a message for an account, so it
    /// costs a set lookup: one task runs every due push in turn, instead of
    /// a task and a timer for each account (most accounts that receive
    /// messages have every device online and need no push at all).
    pub fn wake(&self, account: AccountId) {
        let start = {
            let mut schedule = self.inner.scheduled.lock().unwrap_or_else(PoisonError::into_inner);
            if !schedule.accounts.insert(account) {
                return;
            }
            let at = tokio::time::Instant::now() + Duration::from_millis(self.inner.config.delay_ms);
            schedule.due.push_back((at, account));
            !std::mem::replace(&mut schedule.running, true)
        };
        if start {
            let pusher = self.clone();
            self.inner.tasks.spawn(async move { pusher.run_due().await });
        }
        self.inner.scheduled_more.notify_one();
    }

    /// Runs each scheduled push when it falls due, until shutdown.
    async fn run_due(&self) {
        loop {
            let next = {
                let schedule = self.inner.scheduled.lock().unwrap_or_else(PoisonError::into_inner);
                schedule.due.front().map(|(at, _)| *at)
            };
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = self.inner.scheduled_more.notified(), if next.is_none() => continue,
                _ = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {}
            }
            let now = tokio::time::Instant::now();
            loop {
                let account = {
                    let mut schedule = self.inner.scheduled.lock().unwrap_or_else(PoisonError::into_inner);
                    if schedule.due.front().is_none_or(|(at, _)| *at > now) {
                        break;
                    }
                    let Some((_, account)) = schedule.due.pop_front() else { break };
                    schedule.accounts.remove(&account);
                    account
                };
                if let Err(e) = self.push_account(account).await {
                    tracing::warn!(%account, error = %e, "push failed");
                }
            }
        }
    }

    async fn push_account(&self, account: AccountId) -> Result<(), StoreError> {
        let store = &self.inner.store;
        // Most often every device is online: then nothing else is read.
        let offline: Vec<_> = (store.active_devices(account).await?.into_iter())
            .filter(|device| !self.inner.sessions.is_live_anywhere(account, device.id))
            .collect();
        if offline.is_empty() {
            return Ok(());
        }
        let last = store.read_log_before(account, u64::MAX, 1).await?.first().map(|(seq, _)| *seq).unwrap_or(0);
        for device in offline {
            let Some(target) = store.push_target(device.id).await? else { continue };
            if store.cursor(account, device.id).await?.unwrap_or(0) >= last {
                continue;
            }
            let pusher = self.clone();
            self.inner.tasks.spawn(async move { pusher.push_device(device.id, target).await });
        }
        Ok(())
    }

    async fn push_device(&self, device: DeviceId, target: PushTarget) {
        let mut backoff = Duration::from_millis(self.inner.config.retry_base_ms);
        for attempt in 1..=self.inner.config.attempts.max(1) {
            match self.send(device, &target).await {
                Sent::Delivered => {
                    metrics::counter!("skylark_push_total", "result" => "delivered").increment(1);
                    return;
                }
                Sent::Gone => {
                    metrics::counter!("skylark_push_total", "result" => "gone").increment(1);
                    tracing::info!(%device, "push subscription gone; registration removed");
                    let _ = self.inner.store.set_push_target(device, None).await;
                    return;
                }
                Sent::Fail(why) => {
                    metrics::counter!("skylark_push_total", "result" => "failed").increment(1);
                    tracing::warn!(%device, why, "push refused");
                    return;
                }
                Sent::Retry(why) => {
                    tracing::debug!(%device, why, attempt, "push failed; retrying");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff *= 2;
                }
            }
        }
        metrics::counter!("skylark_push_total", "result" => "failed").increment(1);
    }

    async fn send(&self, device: DeviceId, target: &PushTarget) -> Sent {
        let timeout = Duration::from_millis(self.inner.config.timeout_ms);
        let (url, headers, body) = match target {
            PushTarget::WebPush { endpoint, p256dh, auth } => {
                let Ok(url) = parse_url(endpoint) else { return Sent::Gone };
                let mut salt = [0u8; 16];
                rand::rng().fill_bytes(&mut salt);
                let body = match encrypt_web_push(WAKE_PAYLOAD, p256dh, auth, salt, &random_secret()) {
                    Ok(body) => body,
                    Err(e) => return Sent::Fail(e),
                };
                let authorization =
                    self.inner.vapid.authorization(&url, &self.inner.config.vapid_subject, self.inner.clock.now_ms());
                let headers = vec![
                    ("content-encoding".to_owned(), "aes128gcm".to_owned()),
                    ("content-type".to_owned(), "application/octet-stream".to_owned()),
                    ("ttl".to_owned(), "86400".to_owned()),
                    ("urgency".to_owned(), "high".to_owned()),
                    ("authorization".to_owned(), authorization),
                ];
                (url, headers, body)
            }
            PushTarget::UnifiedPush { endpoint } => {
                let Ok(url) = parse_url(endpoint) else { return Sent::Gone };
                (url, vec![("content-type".to_owned(), "application/json".to_owned())], WAKE_PAYLOAD.to_vec())
            }
            PushTarget::Webhook { token } => {
                let Some(url) = self.inner.webhook.clone() else { return Sent::Fail("no webhook configured".into()) };
                let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
                headers.extend(self.inner.config.webhook_headers.iter().map(|(k, v)| (k.clone(), v.clone())));
                let body = serde_json::json!({ "type": "wake", "device_id": device.0, "token": token }).to_string();
                (url, headers, body.into_bytes())
            }
        };
        match post(&self.inner.client, &url, &headers, body, timeout).await {
            Outcome::Status(s) if (200..300).contains(&s) => Sent::Delivered,
            Outcome::Status(404 | 410) => Sent::Gone,
            Outcome::Status(s) if s == 429 || s >= 500 => Sent::Retry(format!("push service answered {s}")),
            Outcome::Status(s) => Sent::Fail(format!("push service answered {s}")),
            Outcome::Failed(e) => Sent::Retry(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::Aead;

    /// Decrypts with the user agent's side of RFC 8291 (a self-check; the
    /// black-box tests decrypt with an independent implementation).
    #[test]
    fn web_push_record_round_trips() {
        let ua = random_secret();
        let ua_public = ua.public_key().to_encoded_point(false).as_bytes().to_vec();
        let auth = [7u8; 16];
        let body = encrypt_web_push(b"hello", &ua_public, &auth, [1; 16], &random_secret()).unwrap();
        assert_eq!(&body[..16], &[1; 16]);
        assert_eq!(u32::from_be_bytes(body[16..20].try_into().unwrap()), 4096);
        let keyid = &body[21..21 + body[20] as usize];
        let server = PublicKey::from_sec1_bytes(keyid).unwrap();
        let shared = p256::ecdh::diffie_hellman(ua.to_nonzero_scalar(), server.as_affine());
        let mut info = b"WebPush: info\0".to_vec();
        info.extend_from_slice(&ua_public);
        info.extend_from_slice(keyid);
        let mut ikm = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&auth), shared.raw_secret_bytes()).expand(&info, &mut ikm).unwrap();
        let prk = Hkdf::<Sha256>::new(Some(&body[..16]), &ikm);
        let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
        prk.expand(b"Content-Encoding: aes128gcm\0", &mut cek).unwrap();
        prk.expand(b"Content-Encoding: nonce\0", &mut nonce).unwrap();
        let plain = Aes128Gcm::new_from_slice(&cek)
            .unwrap()
            .decrypt(Nonce::from_slice(&nonce), &body[21 + keyid.len()..])
            .unwrap();
        assert_eq!(plain, b"hello\x02");
    }

    #[test]
    fn bad_user_agent_keys_are_refused() {
        assert!(encrypt_web_push(b"x", &[4; 65], &[0; 16], [0; 16], &random_secret()).is_err());
    }
}
