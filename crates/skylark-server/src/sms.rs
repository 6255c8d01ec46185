//! SMS providers: where verification codes are sent.
//!
//! [`SmsSender`] is the seam; [`ConsoleSms`] logs the message (the default,
//! so a local server works offline) and [`HttpSms`] POSTs JSON to any SMS
//! gateway. [`send_with_retry`] retries transient failures with back-off and
//! reports the outcome instead of failing the verification session.

use crate::http_client::{HttpClient, Outcome, new_client, parse_url, post};
use async_trait::async_trait;
use skylark_core::PhoneNumber;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmsError {
    /// Worth retrying: timeouts, connection failures, 5xx answers.
    #[error("sms provider failed temporarily: {0}")]
    Transient(String),
    /// Retrying will not help: configuration errors, 4xx answers.
    #[error("sms provider refused: {0}")]
    Permanent(String),
}

#[async_trait]
pub trait SmsSender: Send + Sync {
    /// Sends `text` (which contains `code`) to `to`.
    async fn send(&self, to: &PhoneNumber, text: &str, code: &str) -> Result<(), SmsError>;
}

/// Writes each message to the server log.
#[derive(Debug, Default)]
pub struct ConsoleSms;

#[async_trait]
impl SmsSender for ConsoleSms {
    async fn send(&self, to: &PhoneNumber, text: &str, _code: &str) -> Result<(), SmsError> {
        // This is the one place a code may appear in the log: printing it is
        // this provider's whole purpose. Never configure it in production.
        tracing::info!(target: "skylark::sms", %to, "SMS (console provider): {text}");
        Ok(())
    }
}

/// POSTs `{"to": "+1555…", "text": "…", "code": "123456"}` to a URL
/// (http or https).
pub struct HttpSms {
    url: hyper::Uri,
    headers: Vec<(String, String)>,
    timeout: Duration,
    client: HttpClient,
}

impl std::fmt::Debug for HttpSms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers hold credentials: never print them.
        f.debug_struct("HttpSms").field("url", &self.url).finish_non_exhaustive()
    }
}

impl HttpSms {
    pub fn new(url: &str, headers: BTreeMap<String, String>, timeout: Duration) -> Result<Self, SmsError> {
        let url = parse_url(url).map_err(SmsError::Permanent)?;
        let mut all = vec![("content-type".to_owned(), "application/json".to_owned())];
        all.extend(headers);
        Ok(Self { url, headers: all, timeout, client: new_client() })
    }
}

#[async_trait]
impl SmsSender for HttpSms {
    async fn send(&self, to: &PhoneNumber, text: &str, code: &str) -> Result<(), SmsError> {
        let body = serde_json::json!({ "to": to.as_str(), "text": text, "code": code }).to_string();
        match post(&self.client, &self.url, &self.headers, body.into_bytes(), self.timeout).await {
            Outcome::Status(s) if (200..300).contains(&s) => Ok(()),
            Outcome::Status(s) if s >= 500 || s == 429 => Err(SmsError::Transient(format!("gateway answered {s}"))),
            Outcome::Status(s) => Err(SmsError::Permanent(format!("gateway answered {s}"))),
            Outcome::Failed(e) => Err(SmsError::Transient(e)),
        }
    }
}

/// Attempts before [`send_with_retry`] gives up.
pub const SMS_ATTEMPTS: u32 = 3;
/// Back-off before the second attempt; doubled for each later one.
pub const SMS_FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Sends with retries on transient errors. Returns the last error if every
/// attempt failed.
pub async fn send_with_retry(sms: &dyn SmsSender, to: &PhoneNumber, text: &str, code: &str) -> Result<(), SmsError> {
    let mut backoff = SMS_FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match sms.send(to, text, code).await {
            Ok(()) => {
                metrics::counter!("skylark_sms_total", "result" => "sent").increment(1);
                return Ok(());
            }
            Err(e @ SmsError::Transient(_)) if attempt < SMS_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "sms send failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(e) => {
                metrics::counter!("skylark_sms_total", "result" => "failed").increment(1);
                tracing::warn!(error = %e, attempt, "sms send failed");
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        failures: AtomicU32,
        calls: AtomicU32,
    }

    #[async_trait]
    impl SmsSender for Flaky {
        async fn send(&self, _: &PhoneNumber, _: &str, _: &str) -> Result<(), SmsError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(SmsError::Transient("down".into()));
            }
            Ok(())
        }
    }

    fn phone() -> PhoneNumber {
        PhoneNumber::parse("+15551230000").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried() {
        let sms = Flaky { failures: AtomicU32::new(2), calls: AtomicU32::new(0) };
        assert_eq!(send_with_retry(&sms, &phone(), "t", "1").await, Ok(()));
        assert_eq!(sms.calls.load(Ordering::SeqCst), 3);

        let sms = Flaky { failures: AtomicU32::new(5), calls: AtomicU32::new(0) };
        assert!(send_with_retry(&sms, &phone(), "t", "1").await.is_err());
        assert_eq!(sms.calls.load(Ordering::SeqCst), SMS_ATTEMPTS);
    }

    #[tokio::test]
    async fn http_provider_posts_json_with_headers() {
        use axum::{Router, extract::State, http::HeaderMap, routing::post};
        type Seen = std::sync::Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>;
        let seen: Seen = Default::default();
        async fn hook(State(seen): State<Seen>, headers: HeaderMap, body: String) -> axum::http::StatusCode {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
            seen.lock().unwrap().push((auth, serde_json::from_str(&body).unwrap()));
            if seen.lock().unwrap().len() == 1 {
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            } else {
                axum::http::StatusCode::OK
            }
        }
        let app = Router::new().route("/send", post(hook)).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let headers = BTreeMap::from([("Authorization".to_owned(), "Bearer k".to_owned())]);
        let sms = HttpSms::new(&format!("http://{addr}/send"), headers, Duration::from_secs(2)).unwrap();
        send_with_retry(&sms, &phone(), "Your code is 123456", "123456").await.unwrap();

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "the 503 was retried");
        assert_eq!(seen[1].0.as_deref(), Some("Bearer k"));
        assert_eq!(seen[1].1["to"], "+15551230000");
        assert_eq!(seen[1].1["code"], "123456");
    }

    #[test]
    fn urls_must_be_http_or_https() {
        assert!(HttpSms::new("https://sms.example/send", BTreeMap::new(), Duration::from_secs(1)).is_ok());
        let err = HttpSms::new("ftp://sms.example/send", BTreeMap::new(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, SmsError::Permanent(m) if m.contains("https://")));
    }
}
