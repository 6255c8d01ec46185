//! A server's TLS stream whose buffers exist only while bytes are in flight.
//!
//! rustls's usual connection keeps a 4 KiB receive buffer for its whole
//! life, and an idle connection spends its life waiting for a read: that
//! buffer was half of what an idle TLS connection cost. This stream drives
//! rustls's unbuffered API instead and owns the three buffers itself —
//! bytes received and not yet decrypted, bytes decrypted and not yet read,
//! bytes encrypted and not yet sent — each made when bytes arrive and
//! dropped when it empties. A connection waiting for its peer holds the
//! TLS state (keys, sequence numbers) and its socket, nothing more.

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Room made for each read from the socket.
const READ_CHUNK: usize = 4096;
/// Received bytes held at most while a record is incomplete: the largest
/// record TLS allows (16 KiB of data, its header and 2 KiB of overhead)
/// and one more read. rustls refuses a longer record before this is hit.
const MAX_INCOMING: usize = 5 + 16_384 + 2_048 + READ_CHUNK;
/// Plaintext taken by one write: bounds what one write encrypts at once.
const MAX_WRITE: usize = 64 * 1024;

pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Received, not yet processed (at most an incomplete record between
    /// calls).
    incoming: Vec<u8>,
    /// Decrypted, not yet read from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// Encrypted (or handshake records), not yet sent from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer closed its side (close_notify or the end of the stream).
    read_closed: bool,
    /// close_notify was queued: nothing more may be written.
    write_closed: bool,
}

/// What [`TlsStream::process`] is asked to do once rustls is ready to
/// carry application data.
enum Want<'a> {
    Nothing,
    Send(&'a [u8]),
    Close,
}

/// Where [`TlsStream::process`] stopped.
#[derive(Debug, PartialEq)]
enum Step {
    /// Ready for application data (the request, if any, was done).
    Ready,
    /// The handshake needs more bytes from the peer.
    NeedInput,
    /// Both sides closed: nothing more can be sent.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Why rustls wrote nothing into the room it was given.
enum Short {
    /// It needs this much room.
    Needs(usize),
    Failed(io::Error),
}

impl From<EncodeError> for Short {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(short) => Short::Needs(short.required_size),
            e => Short::Failed(io::Error::other(e)),
        }
    }
}

impl From<EncryptError> for Short {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(short) => Short::Needs(short.required_size),
            e => Short::Failed(io::Error::other(e)),
        }
    }
}

/// Appends to `out` what `write` puts into the room it is given (`room`
/// bytes first, then as much as it says it needs); on a failure `out` is
/// left as it was.
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Short>,
) -> io::Result<()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Short::Needs(needed)) => room = needed,
            Err(Short::Failed(e)) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
}

impl TlsStream {
    /// Runs the server side of the handshake to its end.
    pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            sent: 0,
            read_closed: false,
            write_closed: false,
        };
        loop {
            // On an error, the alert saying why goes out first, so that a
            // client (even one speaking no TLS) can tell what went wrong.
            let step = match stream.process(Want::Nothing, None) {
                Ok(step) => step,
                Err(e) => {
                    let _ = poll_fn(|cx| stream.poll_send(cx)).await;
                    return Err(e);
                }
            };
            poll_fn(|cx| stream.poll_send(cx)).await?;
            if step == Step::Closed || stream.read_closed {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed during the TLS handshake"));
            }
            if !stream.conn.is_handshaking() {
                return Ok(stream);
            }
            if let Err(e) = poll_fn(|cx| stream.poll_fill(cx, None)).await {
                let _ = poll_fn(|cx| stream.poll_send(cx)).await;
                return Err(e);
            }
        }
    }

    /// Waits until a read would find something: decrypted bytes, the end
    /// of the stream, or bytes on the socket. Holds no buffer meanwhile.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        if self.plain_at < self.plain.len() || self.read_closed {
            return Ok(());
        }
        self.tcp.readable().await
    }

    /// Bytes held in this stream's buffers (for the idle-memory test).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// [`TlsStream::process_input`] on the bytes held in `incoming`.
    fn process(&mut self, want: Want<'_>, out: Option<&mut ReadBuf<'_>>) -> io::Result<Step> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let processed = self.process_input(&mut incoming, want, out);
        if let Ok((_, used)) = processed {
            incoming.drain(..used);
            if !incoming.is_empty() {
                self.incoming = incoming;
            }
        }
        processed.map(|(step, _)| step)
    }

    /// Feeds rustls `input` until it needs more bytes or application data:
    /// decrypted data goes to `out` while it has room (and `plain` holds
    /// nothing older), else to `plain`; records to send go to `outgoing`.
    /// Then does what `want` asks if it can. Returns where it stopped and
    /// how many bytes of `input` it used up; the rest is an incomplete
    /// record.
    fn process_input(
        &mut self,
        input: &mut [u8],
        want: Want<'_>,
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Step, usize)> {
        let mut used = 0;
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(&mut input[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.queue_alerts();
                    return Err(tls_error(e));
                }
            };
            let step = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(out) = out.as_deref_mut().filter(|_| self.plain.is_empty()) {
                            let n = out.remaining().min(payload.len());
                            out.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        self.plain.extend_from_slice(payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(&mut self.outgoing, 2048, |room| Ok(data.encode(room)?))?;
                    None
                }
                // What was encoded stays queued in `outgoing` and is sent
                // before anything encrypted after it.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::NeedInput),
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.read_closed = true;
                    Some(Step::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    match want {
                        Want::Nothing => {}
                        Want::Send(data) => {
                            append(&mut self.outgoing, data.len() + 1024, |room| Ok(traffic.encrypt(data, room)?))?
                        }
                        Want::Close => append(&mut self.outgoing, 256, |room| Ok(traffic.queue_close_notify(room)?))?,
                    }
                    Some(Step::Ready)
                }
                _ => return Err(io::Error::other("rustls asked for something this server does not do (early data)")),
            };
            used += discard;
            if let Some(step) = step {
                return Ok((step, used));
            }
        }
    }

    /// Queues the alert rustls has to send after an error, if any.
    fn queue_alerts(&mut self) {
        loop {
            match self.conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    if append(&mut self.outgoing, 512, |room| Ok(data.encode(room)?)).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads what the socket has and processes it, decrypting into `out`
    /// as far as it has room. Bytes are read onto the stack: only the
    /// incomplete record left at the end is kept (in `incoming`). The end
    /// of the stream sets `read_closed`.
    fn poll_fill(&mut self, cx: &mut Context<'_>, out: Option<&mut ReadBuf<'_>>) -> Poll<io::Result<()>> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read(&mut chunk) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        };
        if n == 0 {
            self.read_closed = true;
            return Poll::Ready(Ok(()));
        }
        if !self.incoming.is_empty() {
            if self.incoming.len() + n > MAX_INCOMING {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS record longer than TLS allows",
                )));
            }
            self.incoming.extend_from_slice(&chunk[..n]);
            return Poll::Ready(self.process(Want::Nothing, out).map(drop));
        }
        let (_, used) = self.process_input(&mut chunk[..n], Want::Nothing, out)?;
        self.incoming.extend_from_slice(&chunk[used..n]);
        Poll::Ready(Ok(()))
    }

    /// Writes everything queued in `outgoing` to the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            ready!(this.poll_fill(cx, Some(buf)))?;
            // Records rustls answers by itself (a key update) go out as
            // soon as the socket takes them; a full socket only delays them.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What was encrypted before goes out before more is taken.
        ready!(this.poll_send(cx))?;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        match this.process(Want::Send(data), None)? {
            Step::Ready => {
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(data.len()))
            }
            Step::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Step::NeedInput => Poll::Ready(Err(io::Error::other("TLS cannot send before its handshake is done"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            ready!(this.poll_send(cx))?;
            this.write_closed = true;
            // A connection already closed both ways has nothing to say.
            this.process(Want::Close, None)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::RootCertStore;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server TLS stream and a tokio-rustls client on loopback.
    async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsStream::accept(tcp, Arc::new(server)).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let client = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        (accepting.await.unwrap(), client)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_whole_and_an_idle_stream_holds_no_buffer() {
        let (mut server, mut client) = pair().await;
        // Larger than a record, a read chunk and a write: split every way.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sending = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sending).await.unwrap();
            client.flush().await.unwrap();
            client
        });
        let mut got = vec![0u8; big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert!(got == big, "the server read other bytes than the client wrote");
        let mut client = writer.await.unwrap();

        server.write_all(&big).await.unwrap();
        server.flush().await.unwrap();
        let mut back = vec![0u8; big.len()];
        client.read_exact(&mut back).await.unwrap();
        assert!(back == big, "the client read other bytes than the server wrote");

        // Everything read and sent: the stream waits holding no buffer.
        assert_eq!(server.buffered(), 0);
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        server.readable().await.unwrap();
        let mut four = [0u8; 4];
        server.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"ping");
        assert_eq!(server.buffered(), 0);

        // A record read in small pieces: the rest waits decrypted, and is
        // let go once read.
        client.write_all(&big[..1000]).await.unwrap();
        client.flush().await.unwrap();
        let mut piece = [0u8; 10];
        server.read_exact(&mut piece).await.unwrap();
        assert!(server.buffered() > 0, "the record's other 990 bytes wait in the stream");
        let mut rest = vec![0u8; 990];
        server.read_exact(&mut rest).await.unwrap();
        assert!(piece[..] == big[..10] && rest[..] == big[10..1000]);
        assert_eq!(server.buffered(), 0);
    }

    #[tokio::test]
    async fn a_close_is_the_end_of_the_stream_on_either_side() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last words");

        server.write_all(b"goodbye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"goodbye");
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(certified.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der())),
            )
            .unwrap();
        let refused = TlsStream::accept(accepted, Arc::new(config)).await;
        assert_eq!(refused.err().map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
        // An alert record says so (what lets a plain client explain itself).
        let mut alert = [0u8; 3];
        tcp.read_exact(&mut alert).await.unwrap();
        assert_eq!(alert[0], 0x15, "an alert record");
        assert_eq!(alert[1], 3, "TLS version 3.x");
    }
}
