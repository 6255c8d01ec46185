//! Which servers the client trusts: the web PKI roots (bundled, so no
//! system certificate store is needed), plus any CA certificates the user
//! names (for a server with its own or a self-signed certificate).

use crate::ClientError;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// TLS settings for connections to a server; cheap to clone.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TlsClient {}

impl TlsClient {
    /// The web PKI roots, plus the certificates in the PEM file `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<TlsClient, ClientError> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = extra_ca {
            let bad = |e: &dyn std::fmt::Display| ClientError::Profile(format!("CA file {}: {e}", path.display()));
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(&e))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(&e))?;
            if certs.is_empty() {
                return Err(bad(&"no certificate in it"));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(&e))?;
            }
        }
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Io(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient { config: Arc::new(config) })
    }

    /// Only the web PKI roots.
    pub fn web_pki() -> TlsClient {
        static DEFAULT: std::sync::OnceLock<TlsClient> = std::sync::OnceLock::new();
        DEFAULT
            .get_or_init(|| TlsClient::new(None).expect("the bundled provider supports the default versions"))
            .clone()
    }

    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Wraps `stream` in TLS to `host`, verifying the server's certificate.
    pub(crate) async fn connect<S>(
        &self,
        host: &str,
        stream: S,
    ) -> Result<tokio_rustls::client::TlsStream<S>, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
            .map_err(|e| ClientError::Io(format!("bad server name {host:?}: {e}")))?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| ClientError::Io(tls_words(&e, host)))
    }
}

/// A failed TLS handshake, in words a person can act on.
fn tls_words(e: &std::io::Error, host: &str) -> String {
    use rustls::{CertificateError, Error};
    let words = match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the server's certificate is not signed by an authority this device trusts (a self-signed or \
             private certificate): if it is yours, trust its CA with --ca FILE"
                .to_owned()
        }
        Some(Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            format!("the server's certificate is not for {host}: use the name the certificate was made for")
        }
        Some(Error::InvalidCertificate(CertificateError::Expired))
        | Some(Error::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            "the server's certificate has expired: its operator must renew it".to_owned()
        }
        Some(other) => format!("the secure connection (TLS) failed: {other}"),
        None => format!("the secure connection (TLS) failed: {e}"),
    };
    format!("{words} (connecting to {host})")
}
