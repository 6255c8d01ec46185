//! The registration HTTP API, from the client side.

use crate::ClientError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// An error with its causes: hyper's own text ("client error (Connect)")
/// says nothing; the TLS or socket error under it does.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A request body as JSON (the shared types always serialise).
fn json<T: serde::Serialize>(body: &T) -> Value {
    serde_json::to_value(body).unwrap_or(Value::Null)
}

pub use skylark_protocol::http::{Link, LinkStatus, Registered, SmsStatus, VerificationView};
use skylark_protocol::http::{LinkRequest, StartVerification, VerifyRequest};

pub struct Api {
    base: String,
    /// Sent as `Authorization: Bearer …` (the admin API's token).
    bearer: Option<String>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("base", &self.base).finish()
    }
}

impl Api {
    /// `base` is the server's HTTP address, such as `http://127.0.0.1:7480`
    /// (or `https://…`, verified against the web PKI roots).
    pub fn new(base: &str) -> Result<Api, ClientError> {
        Self::with_tls(base, &crate::TlsClient::web_pki())
    }

    /// As [`Api::new`], trusting what `tls` trusts for `https://` servers.
    pub fn with_tls(base: &str, tls: &crate::TlsClient) -> Result<Api, ClientError> {
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(ClientError::Profile(format!(
                "server address must start with http:// or https:// (got {base})"
            )));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls.config()).clone())
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Api { base: base.trim_end_matches('/').to_owned(), bearer: None, client })
    }

    /// The same API, sending `token` as a bearer token with every request
    /// (the server's admin listener wants one).
    pub fn with_bearer(mut self, token: &str) -> Api {
        self.bearer = Some(token.to_owned());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn client(&self) -> &Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
        &self.client
    }

    pub async fn start_verification(&self, phone: &str) -> Result<VerificationView, ClientError> {
        self.call("POST", "/v1/verification", Some(json(&StartVerification { phone: phone.to_owned() }))).await
    }

    pub async fn verification(&self, session_id: &str) -> Result<VerificationView, ClientError> {
        self.call("GET", &format!("/v1/verification/{session_id}"), None).await
    }

    pub async fn resend(&self, session_id: &str) -> Result<VerificationView, ClientError> {
        self.call("POST", &format!("/v1/verification/{session_id}/resend"), None).await
    }

    pub async fn verify(
        &self,
        session_id: &str,
        code: &str,
        public_key: &[u8; 32],
        device_name: &str,
    ) -> Result<Registered, ClientError> {
        self.verify_with_pin(session_id, code, public_key, device_name, None).await
    }

    /// As [`Api::verify`], with the number's two-step verification PIN
    /// (needed when the answer was the error `registration_locked`).
    pub async fn verify_with_pin(
        &self,
        session_id: &str,
        code: &str,
        public_key: &[u8; 32],
        device_name: &str,
        pin: Option<&str>,
    ) -> Result<Registered, ClientError> {
        let body = json(&VerifyRequest {
            code: code.to_owned(),
            public_key: BASE64.encode(public_key),
            device_name: device_name.to_owned(),
            pin: pin.map(str::to_owned),
        });
        self.call("POST", &format!("/v1/verification/{session_id}/verify"), Some(body)).await
    }

    /// A new device asks to be linked to an existing account.
    pub async fn create_link(&self, public_key: &[u8; 32], device_name: &str) -> Result<Link, ClientError> {
        let body = json(&LinkRequest { public_key: BASE64.encode(public_key), device_name: device_name.to_owned() });
        self.call("POST", "/v1/links", Some(body)).await
    }

    /// Waits (up to `wait_ms`, at most 30 s per call) for the link's outcome.
    pub async fn wait_link(&self, link_id: &str, wait_ms: u64) -> Result<LinkStatus, ClientError> {
        self.call("GET", &format!("/v1/links/{link_id}?wait_ms={wait_ms}"), None).await
    }

    /// Sends a request and returns the status, `Retry-After` and JSON body
    /// as they came, for callers that need the raw answer.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Option<u64>, Value), ClientError> {
        let io = |e: &(dyn std::error::Error + 'static)| ClientError::Io(error_chain(e));
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(token) = &self.bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(match body {
                Some(bytes) => Full::new(Bytes::from(bytes)),
                None => Full::new(Bytes::new()),
            })
            .map_err(|e| io(&e))?;
        let response = self.client.request(request).await.map_err(|e| io(&e))?;
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let bytes = response.into_body().collect().await.map_err(|e| io(&e))?.to_bytes();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok((status, retry_after, value))
    }

    /// A JSON request; an answer outside 2xx becomes [`ClientError::Api`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let (status, retry_after_secs, value) =
            self.raw(method, path, body.map(|b| b.to_string().into_bytes())).await?;
        if !(200..300).contains(&status) {
            let text = |k: &str| value.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            return Err(ClientError::Api {
                status,
                error: text("error"),
                message: text("message"),
                retry_after_secs,
                body: value,
            });
        }
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(format!("unexpected answer: {e}")))
    }
}
