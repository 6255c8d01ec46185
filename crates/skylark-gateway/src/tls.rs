//! TLS on the listeners (rustls), and the accept loop both listeners share.
//!
//! Handshakes run in their own tasks with a deadline (the connection's
//! authentication deadline), so a client that opens a socket and stalls
//! holds only its own task, never the accept loop.

mod stream;

use crate::Shared;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
pub(crate) use stream::TlsStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long to wait before accepting again after `accept` fails (for
/// example when the process is out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The server's TLS settings from PEM files.
pub fn server_config(cert_file: &Path, key_file: &Path) -> io::Result<Arc<ServerConfig>> {
    let invalid = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{what} {}: {e}", path.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| invalid("cannot read the certificate file", cert_file, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("bad certificate in", cert_file, &e))?;
    if certs.is_empty() {
        return Err(invalid("no certificate in", cert_file, &"empty"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| invalid("cannot read the key file", key_file, &e))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls setup for", cert_file, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("the key does not fit the certificate in", cert_file, &e))?;
    Ok(Arc::new(config))
}

/// A self-signed certificate for `localhost`, `127.0.0.1` and `::1` in
/// `dir` (`cert.pem`, `key.pem`), made on first use and kept, so clients can
/// trust it once (`--ca dir/cert.pem`). For local use only.
pub fn dev_certificate(dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir)?;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, certified.cert.pem())?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// An accepted connection, in TLS or not.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Io {
    /// Waits until a read would find bytes (or the end), holding no
    /// buffer meanwhile.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.readable().await,
            Io::Tls(s) => s.readable().await,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The gateway's TLS settings, if TLS is configured.
pub(crate) fn acceptor(shared: &Shared) -> io::Result<Option<Arc<ServerConfig>>> {
    let tls = &shared.config.tls;
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Ok(Some(server_config(cert, key)?)),
        (None, None) => Ok(None),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "tls needs both cert_file and key_file")),
    }
}

/// Completes the TLS handshake (if any) within the deadline.
pub(crate) async fn handshake(tls: Option<&Arc<ServerConfig>>, stream: TcpStream, deadline: Duration) -> Option<Io> {
    let _ = stream.set_nodelay(true);
    let Some(config) = tls else { return Some(Io::Plain(stream)) };
    match tokio::time::timeout(deadline, TlsStream::accept(stream, config.clone())).await {
        Ok(Ok(stream)) => {
            metrics::counter!("skylark_tls_handshakes_total", "result" => "ok").increment(1);
            Some(Io::Tls(Box::new(stream)))
        }
        Ok(Err(e)) => {
            metrics::counter!("skylark_tls_handshakes_total", "result" => "failed").increment(1);
            tracing::debug!(error = %e, "tls handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("skylark_tls_handshakes_total", "result" => "timed_out").increment(1);
            tracing::debug!("tls handshake timed out");
            None
        }
    }
}

/// Accepts TCP connections until shutdown, handing each to `accepted`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Shared,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let next = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            next = listener.accept() => next,
        };
        match next {
            Ok((stream, peer)) => accepted(stream, peer),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// The HTTP listener as axum sees it: connections whose handshake is done.
pub(crate) struct HttpListener {
    ready: mpsc::Receiver<(Io, SocketAddr)>,
    local: SocketAddr,
}

impl HttpListener {
    pub(crate) fn start(
        listener: TcpListener,
        shared: Shared,
        tls: Option<Arc<ServerConfig>>,
    ) -> io::Result<HttpListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(256);
        let deadline = Duration::from_millis(shared.config.limits.auth_timeout_ms);
        let tracker = shared.tracker.clone();
        tracker.spawn(accept_loop(listener, shared.clone(), move |stream, peer| {
            let (tx, tls) = (tx.clone(), tls.clone());
            shared.tracker.spawn(async move {
                if let Some(io) = handshake(tls.as_ref(), stream, deadline).await {
                    let _ = tx.send((io, peer)).await;
                }
            });
        }));
        Ok(HttpListener { ready, local })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Io, SocketAddr) {
        match self.ready.recv().await {
            Some(next) => next,
            // The accept loop ended (shutdown): never yield again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
