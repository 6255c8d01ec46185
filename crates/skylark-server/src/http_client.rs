//! The outbound HTTP client shared by the SMS and push providers: HTTP/1.1
//! over plain TCP or TLS (rustls, with the web PKI roots bundled, so no
//! system certificate store is needed).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn new_client() -> HttpClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// Checks that `url` is an absolute http(s) URL.
pub fn parse_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!("url must be http:// or https://, got {url:?}")),
    }
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// No answer: connection failure or timeout.
    Failed(String),
}

/// POSTs `body` with `headers`, waiting at most `timeout` for the answer.
pub async fn post(
    client: &HttpClient,
    url: &hyper::Uri,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Outcome {
    let mut request = hyper::Request::post(url.clone());
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = match request.body(Full::new(Bytes::from(body))) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Outcome::Failed("timed out".into()),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            // Drain the body so the connection can be reused; its content is not needed.
            let _ = tokio::time::timeout(timeout, response.into_body().collect()).await;
            Outcome::Status(status)
        }
    }
}
