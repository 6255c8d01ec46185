//! The raw TCP transport: length-prefixed protobuf frames.

use crate::Shared;
use crate::tls::{Io, accept_loop, handshake};
use crate::transport::{Inbound, Transport, close_frame, linger};
use bytes::BytesMut;
use rustls::ServerConfig;
use skylark_protocol::codec::{FrameCodec, FrameError};
use skylark_protocol::{ClientFrame, CloseCode, ServerFrame};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Decoder, Encoder};

/// Read buffer made when bytes arrive. Most frames are small; the codec
/// grows the buffer for a larger frame once its length is known (and within
/// the limit). The buffer is dropped whenever it is empty, so an idle
/// connection holds none (nor does its TLS stream, see `tls::TlsStream`).
const READ_BUFFER: usize = 512;

pub(crate) async fn serve(listener: TcpListener, shared: Shared, tls: Option<Arc<ServerConfig>>) {
    let deadline = Duration::from_millis(shared.config.limits.auth_timeout_ms);
    let each = shared.clone();
    accept_loop(listener, shared, move |stream, peer| {
        // The address's slot is taken before the handshake, so a flood of
        // half-open TLS handshakes from one address is bounded too.
        let slot = each.slots.acquire(peer.ip());
        let (shared, tls) = (each.clone(), tls.clone());
        let span = crate::session::connection_span(peer, "tcp");
        // Boxed, and made before the task: what a task captures, and what it
        // awaits inline, it keeps room for during its whole life; the socket
        // and the TLS handshake are passed through once.
        let handshake = Box::pin(async move { handshake(tls.as_ref(), stream, deadline).await });
        skylark_server::spawn_in(&each.tracker, span, async move {
            let Some(io) = handshake.await else { return };
            let max = shared.config.limits.max_frame_bytes;
            let mut transport = TcpTransport { io, codec: FrameCodec::new(max), read: BytesMut::new(), closed: false };
            if slot.is_some() {
                crate::session::run(&shared, &mut transport, "tcp").await;
                drop(slot);
            } else {
                transport.close(CloseCode::TryAgainLater, "too many connections from this address").await;
            }
        });
    })
    .await;
}

/// Length-prefixed frames on a byte stream. No write buffer is kept
/// between frames (tokio-util's `Framed` keeps 8 KiB per connection for
/// that), and the read buffer exists only while bytes are pending, so an
/// idle connection holds almost nothing but its socket.
struct TcpTransport {
    io: Io,
    codec: FrameCodec<ClientFrame, ServerFrame>,
    read: BytesMut,
    closed: bool,
}

impl Transport for TcpTransport {
    /// Cancel-safe: bytes read stay in `read` until a whole frame is there.
    async fn recv(&mut self) -> Inbound {
        loop {
            match self.codec.decode(&mut self.read) {
                Ok(Some(frame)) => {
                    if self.read.is_empty() {
                        self.read = BytesMut::new();
                    }
                    return Inbound::Frame(frame);
                }
                Ok(None) => {}
                Err(FrameError::TooLarge { len, max }) => return Inbound::TooLarge { len, max },
                Err(FrameError::Malformed(why)) => return Inbound::Malformed(why),
                Err(FrameError::Io(_)) => return Inbound::Closed,
            }
            if self.closed {
                return Inbound::Closed;
            }
            if self.read.capacity() == 0 {
                // Wait for bytes before making room for them.
                if self.io.readable().await.is_err() {
                    self.closed = true;
                    return Inbound::Closed;
                }
            }
            if self.read.capacity() == self.read.len() {
                self.read.reserve(READ_BUFFER);
            }
            match self.io.read_buf(&mut self.read).await {
                Ok(0) | Err(_) => {
                    self.closed = true;
                    // A partial frame at the end of the stream is no frame.
                    return Inbound::Closed;
                }
                Ok(_) => {}
            }
        }
    }

    async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
        let mut out = BytesMut::new();
        self.codec.encode(frame, &mut out).map_err(|_| ())?;
        self.io.write_all(&out).await.map_err(|_| ())?;
        self.io.flush().await.map_err(|_| ())
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let _ = self.send(close_frame(code, reason)).await;
        linger(&mut self.io).await;
    }
}
